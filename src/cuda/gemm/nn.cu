// SPDX-License-Identifier: Apache-2.0
// NN (neighborhood-neighborhood): a query tile's weighted sum of its key box's rows,
// on tensor cores, the weights gathered from window slots in shared memory.
//
// One CTA owns a query tile for one head and kCols output columns. For each slab of
// the window (tile.hpp) it loads the slab's run of slots of every row, 16 bytes per
// lane where the rows allow (the workspace's padded rows always do), then walks the
// slab's key box in key tiles (V rows double-buffered by cp.async). Per 16 keys a warp
// builds its mma A fragment from the slab tile: element (query, key) is the weight at
// slot (key code - window base) when the key lies in the query's window through the
// slab, else 0. Chunks of 8 keys that miss the union of the warp's windows are
// skipped. The accumulators leave once, through shared memory, in 16-byte stores.
#include "cuda/common/check.hpp"
#include "cuda/gemm/device.cuh"
#include "cuda/gemm/kernels.hpp"

namespace nbhd::cuda::gemm {
namespace {

template <class T, class A>
__global__ void __launch_bounds__(kThreads, 4) nn_kernel(const __grid_constant__ NnParams p) {
  using Ops = Mma<T>;
  constexpr int kVecT = 16 / int(sizeof(T));
  constexpr int kVecA = 16 / int(sizeof(A));
  extern __shared__ __align__(16) unsigned char smem[];
  const NnSmem& L = p.smem;
  T* const sv = reinterpret_cast<T*>(smem + L.v);  // [2][kBlockK][v_stride]; the output at the end
  int64_t* const key_delta = reinterpret_cast<int64_t*>(smem + L.key_delta);
  int* const key_packed = reinterpret_cast<int*>(smem + L.key_offset);
  int64_t* const row_w = reinterpret_cast<int64_t*>(smem + L.row_offset);  // -1: row past the grid
  int64_t* const row_out = row_w + kBlockQ;
  A* const wt = reinterpret_cast<A*>(smem + L.tile);  // [kBlockQ][tile_cols]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const QueryGrid& grid = p.grid;
  const Neighborhood& nb = grid.nb;
  const TileShape& shape = grid.shape;

  int64_t linear = blockIdx.x;
  const int64_t tile_index = linear % grid.tiles;
  linear /= grid.tiles;
  const int h = int(linear % grid.heads);
  const int64_t b = linear / grid.heads;
  const int hk = h / grid.heads_per_kv;
  const int col0 = int(blockIdx.y) * kCols;
  const int ncols = imin(kCols, p.dim - col0);
  GroupTile qt;
  if (!decode_group_tile(nb, grid.tiles_per_group, shape.q_log2, tile_index, qt)) return;

  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  const QueryRow rows[2] = {query_row(nb, shape, qt, my_row[0]), query_row(nb, shape, qt, my_row[1])};
  if (t4 == 0) {
    for (int i = 0; i < 2; ++i) {
      int token[kMaxRank];
      token_of(nb, qt.group, rows[i].j, token);
      row_w[my_row[i]] = rows[i].valid ? p.w_layout.offset(b, token, h) : -1;
      row_out[my_row[i]] = p.out_layout.offset(b, token, h);
    }
  }
  int extent[kMaxRank], warp_first[kMaxRank], warp_extent[kMaxRank];
  shape.warp_offset(warp, warp_first);
  for (int a = 0; a < kMaxRank; ++a) {
    extent[a] = shape.q(a);
    warp_first[a] += qt.origin[a];
    warp_extent[a] = shape.w(a);
  }
  const Extremes cta = extremes(nb, qt.lg, qt.origin, extent);
  const Extremes wx = extremes(nb, qt.lg, warp_first, warp_extent);

  key_tables(nb, shape, p.y.layout, key_delta, key_packed);
  __syncthreads();  // key tables, row offsets

  const int lane_kn = lane_offset_kn<T>(lane, L.v_stride);
  const int ss0 = slot_stride(nb, 0), ss1 = slot_stride(nb, 1);
  const T* const y = static_cast<const T*>(p.y.data);
  const T* const y_extra = static_cast<const T*>(p.y_extra.data);
  const A* const weights = static_cast<const A*>(p.weights);

  float acc[kCols / 8][4];
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  for (int si = 0; si < p.slabs.count(); ++si) {
    const Slab slab = slab_at(p.slabs, nb, p.extra, si);
    const int s_base = slab.s0 - slab.s0 % kVecA;
    const Box box = slab_box(cta, slab);
    const Box wbox = slab_box(wx, slab);
    const KeyTiles kt = key_tiles(box, shape);
    const int stages = kt.total + ceil_div(slab.m1 - slab.m0, kBlockK);
    const RowSlab rs[2] = {row_slab(rows[0], slab, s_base, my_row[0], L.tile_cols, p.window),
                           row_slab(rows[1], slab, s_base, my_row[1], L.tile_cols, p.window)};

    // The slab's slots of every row (the previous slab's last stage ended with a barrier).
    {
      const int units = ceil_div(slab.s1 - s_base, kVecA);
      const int64_t inner = p.w_layout.inner;
      for (int idx = tid; idx < kBlockQ * units; idx += kThreads) {
        const int r = idx / units, u = idx - r * units;
        const int64_t ro = row_w[r];
        if (ro < 0) continue;
        const int first = s_base + u * kVecA;
        A* dst = wt + r * L.tile_cols + u * kVecA;
        const A* src = weights + ro;
        if (p.w_vec && first + kVecA <= p.weight_capacity) {
          ptx::cp_async_16(ptx::smem_address(dst), src + first, 16);
        } else {
#pragma unroll
          for (int e = 0; e < kVecA; ++e) {
            const int sl = first + e;
            if (sl >= slab.s0 && sl < slab.s1) dst[e] = src[sl * inner];
          }
        }
      }
    }

    auto issue = [&](int it) {
      T* dst = sv + (it & 1) * kBlockK * L.v_stride;
      KeySource src;
      if (it < kt.total) {
        int origin[kMaxRank];
        key_tile_origin(kt, box, shape, it, origin);
        src = window_source<true>(nb, shape, y, p.y.layout, b, hk, qt.group, origin, box);
        load_key_tile<true>(dst, L.v_stride, src, key_delta, key_packed, col0, kCols / kVecT, p.dim, p.y.layout.inner,
                            p.y.vec, p.y.data, nb, p.y.layout);
      } else {
        const int m0 = slab.m0 + (it - kt.total) * kBlockK;
        const int first[kMaxRank] = {0, 0, m0};
        src.base = y_extra + p.y_extra.layout.offset(b, first, hk);
        src.extra_rows = imin(kBlockK, slab.m1 - m0);
        src.wraps = false;
        load_key_tile<true>(dst, L.v_stride, src, key_delta, key_packed, col0, kCols / kVecT, p.dim,
                            p.y_extra.layout.inner, p.y_extra.vec, p.y_extra.data, nb, p.y_extra.layout);
      }
    };

    if (stages > 0) issue(0);
    ptx::cp_async_commit();  // with the slab's weights
    for (int it = 0; it < stages; ++it) {
      if (it + 1 < stages) {
        issue(it + 1);
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
      } else {
        ptx::cp_async_wait<0>();
      }
      __syncthreads();  // stage `it` and the slab's weights landed

      const bool extra_tile = it >= kt.total;
      int origin[kMaxRank] = {0, 0, 0};
      int m_tile = 0;
      uint32_t active;
      if (!extra_tile) {
        key_tile_origin(kt, box, shape, it, origin);
        active = window_chunks(shape, origin, wbox, wx.empty, lane);
      } else {
        m_tile = slab.m0 + (it - kt.total) * kBlockK;
        active = extra_chunks(m_tile, slab.m1, wx.empty, lane);
      }
      if (active) {
        const T* v_stage = sv + (it & 1) * kBlockK * L.v_stride;
#pragma unroll
        for (int ks = 0; ks < kBlockK / Ops::kK; ++ks) {
          constexpr int kChunksPerStep = Ops::kK / kChunkKeys;
          const uint32_t step_bits = (active >> (ks * kChunksPerStep)) & ((1u << kChunksPerStep) - 1);
          if (!step_bits) continue;  // warp-uniform
          const int kbase = ks * Ops::kK;
          typename Ops::A a;
          if (!extra_tile) {
            a = Ops::make_a(lane, [&](int i, int c) {
              int off[kMaxRank];
              shape.key_offset(kbase + c, off);
              const int k0 = origin[0] + off[0], k1 = origin[1] + off[1], k2 = origin[2] + off[2];
              const RowSlab& R = rs[i];
              float w = 0.f;
              if (in(k0, R.key[0]) && in(k1, R.key[1]) && in(k2, R.key[2]))
                w = to_float(wt[k0 * ss0 + k1 * ss1 + k2 - R.base]);
              return w;
            });
          } else {
            a = Ops::make_a(lane, [&](int i, int c) {
              const int m = m_tile + kbase + c;
              const RowSlab& R = rs[i];
              float w = 0.f;
              if (R.valid && m < slab.m1) w = to_float(wt[R.extra_base + m]);
              return w;
            });
          }
#pragma unroll
          for (int np = 0; np < kCols / 16; ++np) {
            if (np * 16 >= ncols) continue;  // uniform: past the head dim
            typename Ops::B b0, b1;
            Ops::load_b_kn(v_stage, L.v_stride, kbase, np * 16, lane_kn, b0, b1);
            Ops::mma(acc[2 * np], a, b0);
            Ops::mma(acc[2 * np + 1], a, b1);
          }
        }
      }
      __syncthreads();  // the next stage's loads overwrite this stage; the next slab the weights
    }
    ptx::cp_async_wait<0>();
    __syncthreads();
  }

  // ---- out = alpha * acc, staged through shared memory (the V stages)
  T* const stage = sv;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      T* dst = stage + my_row[i] * L.v_stride + 8 * j + 2 * t4;
      dst[0] = from_float<T>(p.alpha * acc[j][2 * i]);
      dst[1] = from_float<T>(p.alpha * acc[j][2 * i + 1]);
    }
  __syncthreads();
  T* const out = static_cast<T*>(p.out);
  constexpr int kUnits = kCols / kVecT;
  for (int idx = tid; idx < kBlockQ * kUnits; idx += kThreads) {
    const int r = idx / kUnits, u = idx - r * kUnits;
    if (row_w[r] < 0 || u * kVecT >= ncols) continue;
    store_unit(out + row_out[r], stage + r * L.v_stride + u * kVecT, col0 + u * kVecT, p.dim, p.out_layout.inner,
               p.out_vec);
  }
}

}  // namespace

template <class T, class A>
cudaError_t launch_nn(const NnParams& p, int64_t blocks, int column_chunks, cudaStream_t stream) {
  auto kernel = nn_kernel<T, A>;
  if (const cudaError_t err = allow_shared_memory<nn_kernel<T, A>>(); err != cudaSuccess) return err;
  if (blocks > 0x7fffffff || column_chunks > 65535) return cudaErrorInvalidConfiguration;
  if (blocks == 0 || column_chunks == 0) return cudaSuccess;
  kernel<<<dim3(unsigned(blocks), unsigned(column_chunks)), dim3(kThreads), p.smem.bytes, stream>>>(p);
  return cudaGetLastError();
}

#define NBHD_GEMM_NN(T, A) template cudaError_t launch_nn<T, A>(const NnParams&, int64_t, int, cudaStream_t);
NBHD_GEMM_IF_FLOAT16(NBHD_GEMM_NN(__half, float) NBHD_GEMM_NN(__half, __half))
NBHD_GEMM_IF_BFLOAT16(NBHD_GEMM_NN(__nv_bfloat16, float) NBHD_GEMM_NN(__nv_bfloat16, __nv_bfloat16))
NBHD_GEMM_IF_FLOAT32(NBHD_GEMM_NN(float, float))
#undef NBHD_GEMM_NN

}  // namespace nbhd::cuda::gemm
