// SPDX-License-Identifier: Apache-2.0
// IN (inverse-neighborhood): for a key tile, the weighted sum of the rows of the
// queries whose windows hold its keys, on tensor cores. d value (weights = probs,
// x = d out) and d key (weights = d scores, x = q, alpha = scale).
//
// One CTA owns a key tile (kBlockK keys of one dilation group, 16 consecutive per
// warp) for one kv head and kCols output columns. Its queries are the box
// Axis::inverse_window_union gives per axis, walked in query tiles of kBlockQI for
// every query head of the kv head's group. Per query tile it loads the query rows of
// x (16 bytes per lane) and gathers the dense [query][key] block of weights: element
// (q, k) is w[q, slot(q, k)] when k lies in q's window, else 0. On a periodic axis
// the query box is unwrapped (it may begin below 0 or end past the group length, and
// hold a query twice); a row at index j is query wrap(j) with its window moved by
// j - wrap(j), so that each (query, key) pair lands in exactly one row. The gather reads a
// query's slots for this key tile, runs of consecutive slots, with 4-byte cp.async
// from the float32 workspace (the rows' slot runs start anywhere, so 16-byte copies
// would need both sides to share an alignment they do not have). The mma A operand
// is that block transposed. Every output row is written once, by its CTA: no atomics.
#include "cuda/common/check.hpp"
#include "cuda/gemm/device.cuh"
#include "cuda/gemm/kernels.hpp"

namespace nbhd::cuda::gemm {
namespace {

template <class T, class A>
__global__ void __launch_bounds__(kThreads, 4) in_kernel(const __grid_constant__ InParams p) {
  using Ops = Mma<T>;
  constexpr int kVecT = 16 / int(sizeof(T));
  extern __shared__ __align__(16) unsigned char smem[];
  const InSmem& L = p.smem;
  T* const sx = reinterpret_cast<T*>(smem + L.x);                 // [2][kBlockQI][x_stride]; the output at the end
  float* const dense = reinterpret_cast<float*>(smem + L.dense);  // [2][kBlockQI][dense_stride]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const Neighborhood& nb = p.nb;
  const TileShape& shape = p.shape;

  int64_t linear = blockIdx.x;
  const int64_t tile_index = linear % p.tiles;
  linear /= p.tiles;
  const int hk = int(linear % p.kv_heads);
  const int64_t b = linear / p.kv_heads;
  const int col0 = int(blockIdx.y) * kCols;
  const int ncols = imin(kCols, p.dim - col0);
  GroupTile kt;
  if (!decode_group_tile(nb, p.tiles_per_group, shape.k_log2, tile_index, kt)) return;

  // The queries whose windows meet the key tile (per axis, a closed form).
  Box ibox;
  for (int a = 0; a < kMaxRank; ++a) {
    const Range keys{kt.origin[a], imin(kt.origin[a] + shape.k(a), kt.lg[a])};
    ibox.r[a] = nb.axis[a].inverse_window_union(keys, kt.lg[a]);
  }
  int qcount[kMaxRank], qtiles = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    qcount[a] = imax(ceil_div(ibox.r[a].size(), shape.q(a)), 0);  // (windows cover every key: never 0)
    qtiles *= qcount[a];
  }
  const int stages = p.heads_per_kv * qtiles;

  const int ss0 = slot_stride(nb, 0), ss1 = slot_stride(nb, 1);
  // Key code of the tile origin: a key's code is this plus its offsets' codes.
  const int origin_code = kt.origin[0] * ss0 + kt.origin[1] * ss1 + kt.origin[2];
  const T* const x = static_cast<const T*>(p.x.data);
  const A* const weights = static_cast<const A*>(p.weights);

  // Gather role: query row `grow` of each query tile, keys (tid % 4) + 4i.
  const int grow = tid >> 2, gkey = tid & 3;
  int grow_off[kMaxRank];
  box_offset(grow, shape.q_log2, grow_off);

  auto issue = [&](int it) {
    const int h = hk * p.heads_per_kv + it / qtiles;
    int qi = it % qtiles, qorigin[kMaxRank];
    for (int a = kMaxRank - 1; a >= 0; --a) {
      qorigin[a] = ibox.r[a].begin + (qi % qcount[a]) * shape.q(a);
      qi /= qcount[a];
    }
    // x rows of the query tile, kCols columns.
    T* x_dst = sx + (it & 1) * kBlockQI * L.x_stride;
    constexpr int kUnits = kCols / kVecT;
    for (int idx = tid; idx < kBlockQI * kUnits; idx += kThreads) {
      const int r = idx / kUnits, u = idx - r * kUnits;
      int off[kMaxRank], j[kMaxRank], token[kMaxRank];
      box_offset(r, shape.q_log2, off);
      bool valid = true;
      for (int a = 0; a < kMaxRank; ++a) {
        j[a] = qorigin[a] + off[a];
        valid &= j[a] < ibox.r[a].end;
      }
      token_of(nb, kt.group, j, token);
      load_unit(x_dst + r * L.x_stride + u * kVecT, valid ? x + p.x.layout.offset(b, token, h) : x, col0 + u * kVecT,
                p.dim, p.x.layout.inner, p.x.vec, valid, p.x.data);
    }
    // This thread's query row of the dense weights: its window per axis, as key
    // offsets from the tile origin (periodic: the window of the query j stands for,
    // moved next to the key tile; geometry.hpp, inverse_row).
    int j[kMaxRank], token[kMaxRank];
    bool valid = true;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = qorigin[a] + grow_off[a];
      valid &= j[a] < ibox.r[a].end;
    }
    const InverseRow row = inverse_row(nb, kt, j, valid);
    const Span keys[kMaxRank] = {row.keys[0], row.keys[1], row.keys[2]};
    const int base = row.base;
    token_of(nb, kt.group, j, token);  // wraps an unwrapped index
    const A* w_row = valid ? weights + p.w_layout.offset(b, token, h) : weights;
    const int64_t inner = p.w_layout.inner;
    float* d_dst = dense + (it & 1) * kBlockQI * L.dense_stride + grow * L.dense_stride;
#pragma unroll 4
    for (int i = 0; i < kBlockK / 4; ++i) {
      const int n = gkey + 4 * i;
      int off[kMaxRank];
      shape.key_offset(n, off);
      const bool ok = in(off[0], keys[0]) && in(off[1], keys[1]) && in(off[2], keys[2]);
      const int slot = origin_code + off[0] * ss0 + off[1] * ss1 + off[2] - base;
      if constexpr (sizeof(A) == 4) {
        ptx::cp_async_4(ptx::smem_address(d_dst + n), ok ? static_cast<const void*>(w_row + slot * inner) : weights,
                   ok ? 4 : 0);
      } else {
        float v = 0.f;
        if (ok) v = to_float(w_row[slot * inner]);
        d_dst[n] = v;
      }
    }
  };

  const int lane_kn = lane_offset_kn<T>(lane, L.x_stride);
  float acc[kCols / 8][4];
#pragma unroll
  for (int jb = 0; jb < kCols / 8; ++jb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[jb][e] = 0.f;

  if (stages > 0) {
    issue(0);
    ptx::cp_async_commit();
  }
  for (int it = 0; it < stages; ++it) {
    if (it + 1 < stages) {
      issue(it + 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();

    const T* x_stage = sx + (it & 1) * kBlockQI * L.x_stride;
    const float* d_stage = dense + (it & 1) * kBlockQI * L.dense_stride + warp * 16 + g;
#pragma unroll
    for (int ks = 0; ks < kBlockQI / Ops::kK; ++ks) {
      const int kbase = ks * Ops::kK;
      // A (keys x queries) = the dense block transposed: rows g, g + 8 of the warp's keys.
      const typename Ops::A a =
          Ops::make_a(lane, [&](int i, int c) { return d_stage[(kbase + c) * L.dense_stride + 8 * i]; });
#pragma unroll
      for (int np = 0; np < kCols / 16; ++np) {
        if (np * 16 >= ncols) continue;  // uniform: past the head dim
        typename Ops::B b0, b1;
        Ops::load_b_kn(x_stage, L.x_stride, kbase, np * 16, lane_kn, b0, b1);
        Ops::mma(acc[2 * np], a, b0);
        Ops::mma(acc[2 * np + 1], a, b1);
      }
    }
    __syncthreads();
  }

  // ---- out = alpha * acc, staged through shared memory (the x stages: kBlockK rows)
  T* const stage = sx;
#pragma unroll
  for (int jb = 0; jb < kCols / 8; ++jb)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      T* dst = stage + (warp * 16 + g + 8 * i) * L.x_stride + 8 * jb + 2 * t4;
      dst[0] = from_float<T>(p.alpha * acc[jb][2 * i]);
      dst[1] = from_float<T>(p.alpha * acc[jb][2 * i + 1]);
    }
  __syncthreads();
  T* const out = static_cast<T*>(p.out);
  constexpr int kUnits = kCols / kVecT;
  for (int idx = tid; idx < kBlockK * kUnits; idx += kThreads) {
    const int n = idx / kUnits, u = idx - n * kUnits;
    if (u * kVecT >= ncols) continue;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.key_offset(n, off);
    bool valid = true;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = kt.origin[a] + off[a];
      valid &= j[a] < kt.lg[a];
    }
    if (!valid) continue;
    token_of(nb, kt.group, j, token);
    store_unit(out + p.out_layout.offset(b, token, hk), stage + n * L.x_stride + u * kVecT, col0 + u * kVecT, p.dim,
               p.out_layout.inner, p.out_vec);
  }
}

}  // namespace

template <class T, class A>
cudaError_t launch_in(const InParams& p, int64_t blocks, int column_chunks, cudaStream_t stream) {
  auto kernel = in_kernel<T, A>;
  if (const cudaError_t err = allow_shared_memory<in_kernel<T, A>>(); err != cudaSuccess) return err;
  if (blocks > 0x7fffffff || column_chunks > 65535) return cudaErrorInvalidConfiguration;
  if (blocks == 0 || column_chunks == 0) return cudaSuccess;
  kernel<<<dim3(unsigned(blocks), unsigned(column_chunks)), dim3(kThreads), p.smem.bytes, stream>>>(p);
  return cudaGetLastError();
}

#define NBHD_GEMM_IN(T, A) template cudaError_t launch_in<T, A>(const InParams&, int64_t, int, cudaStream_t);
NBHD_GEMM_IF_FLOAT16(NBHD_GEMM_IN(__half, float) NBHD_GEMM_IN(__half, __half))
NBHD_GEMM_IF_BFLOAT16(NBHD_GEMM_IN(__nv_bfloat16, float) NBHD_GEMM_IN(__nv_bfloat16, __nv_bfloat16))
NBHD_GEMM_IF_FLOAT32(NBHD_GEMM_IN(float, float))
#undef NBHD_GEMM_IN

}  // namespace nbhd::cuda::gemm
