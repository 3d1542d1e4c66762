// SPDX-License-Identifier: Apache-2.0
// PN (pointwise-neighborhood): a query tile's dot products with its key box, on
// tensor cores, scattered into window slots in shared memory and stored row by row.
//
// One CTA owns a query tile (kBlockQ queries of one dilation group, 16 per warp, each
// warp's a box) for one head. For each slab of the window (tile.hpp; one slab when a
// whole row fits in shared memory) it
//   - fills the slab tile [query][slot] with the masked value (-inf for scores),
//   - walks the key box of the slab (the union of its queries' windows through the
//     slab's offsets) in key tiles of kBlockK keys, double-buffered by cp.async, the
//     head dim in chunks of kCols; a warp skips each 8-key chunk that misses the
//     union of its own queries' windows (predicated mma),
//   - scatters each computed score that lies in its query's window into the slab
//     tile at (query, slot = key code - window base), adding scale and bias,
//   - runs the epilogue (softmax or softmax backward when the slab is the whole row),
//   - stores the slab's run of slots of every row, 16 bytes per lane where the rows
//     allow (the workspace's padded rows always do).
// The additional tokens are key tiles of their own, slots W.. of the row.
#include <cmath>

#include "cuda/common/check.hpp"
#include "cuda/gemm/device.cuh"
#include "cuda/gemm/kernels.hpp"

namespace nbhd::cuda::gemm {
namespace {

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// 16 bytes of A from floats in shared memory (4 floats, or 8 converted to 16 bits).
template <class A>
__device__ __forceinline__ void store16(A* dst, const float* src) {
  if constexpr (sizeof(A) == 4) {
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
  } else {
    const float4 lo = reinterpret_cast<const float4*>(src)[0], hi = reinterpret_cast<const float4*>(src)[1];
    uint4 v;
    v.x = ptx::pack2<A>(lo.x, lo.y);
    v.y = ptx::pack2<A>(lo.z, lo.w);
    v.z = ptx::pack2<A>(hi.x, hi.y);
    v.w = ptx::pack2<A>(hi.z, hi.w);
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

// kPeriodic: the problem has a periodic axis, whose key tiles past a group's end load
// row by row (device.cuh, load_key_tile); the kernel without it keeps the registers of
// the plain path (with it, ptxas spilled a few bytes in float32).
template <class T, class A, bool kPeriodic>
__global__ void __launch_bounds__(kThreads, 4) pn_kernel(const __grid_constant__ PnParams p) {
  using Ops = Mma<T>;
  constexpr int kVecT = 16 / int(sizeof(T));
  constexpr int kVecA = 16 / int(sizeof(A));
  extern __shared__ __align__(16) unsigned char smem[];
  const PnSmem& L = p.smem;
  T* const sq = reinterpret_cast<T*>(smem + L.q);  // [kBlockQ][q_stride]
  T* const sk = reinterpret_cast<T*>(smem + L.k);  // [2][kBlockK][k_stride]
  int64_t* const key_delta = reinterpret_cast<int64_t*>(smem + L.key_delta);
  int* const key_packed = reinterpret_cast<int*>(smem + L.key_offset);
  int64_t* const row_out = reinterpret_cast<int64_t*>(smem + L.row_out);  // -1: row past the grid
  int64_t* const row_lse = row_out + kBlockQ;
  float* const tile = reinterpret_cast<float*>(smem + L.tile);  // [kBlockQ][tile_cols]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const QueryGrid& grid = p.grid;
  const Neighborhood& nb = grid.nb;
  const TileShape& shape = grid.shape;

  // ---- which tile, head, batch
  int64_t linear = blockIdx.x;
  const int64_t tile_index = linear % grid.tiles;
  linear /= grid.tiles;
  const int h = int(linear % grid.heads);
  const int64_t b = linear / grid.heads;
  const int hk = h / grid.heads_per_kv;
  GroupTile qt;
  if (!decode_group_tile(nb, grid.tiles_per_group, shape.q_log2, tile_index, qt)) return;

  // ---- this thread's rows (g and g + 8 of its warp, the mma C layout), the tile's
  // and the warp's window extremes. Each slab recomputes the rows and extremes it
  // needs (a few integer operations) rather than keeping them live through the key
  // loop: registers are what the kernel is short of.
  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  for (int i = 0; i < 2; ++i) {
    const QueryRow row = query_row(nb, shape, qt, my_row[i]);
    if (t4 == 0) {
      int token[kMaxRank];
      token_of(nb, qt.group, row.j, token);
      row_out[my_row[i]] = row.valid ? p.out_layout.offset(b, token, h) : -1;
      row_lse[my_row[i]] = p.lse_layout.offset(b, token, h);
    }
  }
  key_tables(nb, shape, p.y.layout, key_delta, key_packed);

  // ---- the query tile, all of the (padded) head dim
  const T* const x = static_cast<const T*>(p.x.data);
  {
    const int units = p.dim_pad / kVecT;
    for (int idx = tid; idx < kBlockQ * units; idx += kThreads) {
      const int r = idx / units, u = idx - r * units;
      int off[kMaxRank], j[kMaxRank], token[kMaxRank];
      shape.query_offset(r, off);
      bool valid = true;
      for (int a = 0; a < kMaxRank; ++a) {
        j[a] = qt.origin[a] + off[a];
        valid &= j[a] < qt.lg[a];
      }
      token_of(nb, qt.group, j, token);
      load_unit(sq + r * L.q_stride + u * kVecT, valid ? x + p.x.layout.offset(b, token, h) : x, u * kVecT, p.dim,
                p.x.layout.inner, p.x.vec, valid, p.x.data);
    }
    ptx::cp_async_commit();
  }
  __syncthreads();  // key tables

  const uint32_t q_lane =
      ptx::smem_address(sq) + uint32_t((warp * 16 * L.q_stride + lane_offset_a(lane, L.q_stride, kVecT)) * sizeof(T));
  const uint32_t k_lane = ptx::smem_address(sk) + uint32_t(lane_offset_b_nk(lane, L.k_stride, kVecT) * sizeof(T));
  const uint32_t k_stage_bytes = uint32_t(kBlockK * L.k_stride * sizeof(T));
  const int chunks = ceil_div(p.dim_pad, kCols);
  const int ss0 = slot_stride(nb, 0), ss1 = slot_stride(nb, 1);
  const T* const y = static_cast<const T*>(p.y.data);
  const T* const y_extra = static_cast<const T*>(p.y_extra.data);

  for (int si = 0; si < p.slabs.count(); ++si) {
    const Slab slab = slab_at(p.slabs, nb, p.extra, si);
    const int s_base = slab.s0 - slab.s0 % kVecA;
    int extent[kMaxRank], warp_first[kMaxRank], warp_extent[kMaxRank];
    shape.warp_offset(warp, warp_first);
    for (int a = 0; a < kMaxRank; ++a) {
      extent[a] = shape.q(a);
      warp_first[a] += qt.origin[a];
      warp_extent[a] = shape.w(a);
    }
    const Extremes wx = extremes(nb, qt.lg, warp_first, warp_extent);
    const Box box = slab_box(extremes(nb, qt.lg, qt.origin, extent), slab);
    const Box wbox = slab_box(wx, slab);
    const bool warp_idle = wx.empty;
    const KeyTiles kt = key_tiles(box, shape);
    const int tiles = kt.total + ceil_div(slab.m1 - slab.m0, kBlockK);
    const int stages = tiles * chunks;
    RowSlab rs[2];
    int64_t rpb_row[2];  // bias offset of key code 0 on every axis
    for (int i = 0; i < 2; ++i) {
      const QueryRow row = query_row(nb, shape, qt, my_row[i]);
      rs[i] = row_slab(row, slab, s_base, my_row[i], L.tile_cols, p.window);
      rpb_row[i] = int64_t(h) * p.rpb_layout.head;
      for (int a = 0; a < kMaxRank; ++a)
        rpb_row[i] += int64_t(nb.axis[a].kernel - 1 - row.j[a]) * p.rpb_layout.axis[a];
    }
    for (int i = tid; i < kBlockQ * L.tile_cols; i += kThreads) tile[i] = p.masked;

    // Stage `it`: head-dim chunk it % chunks of key tile it / chunks.
    auto issue = [&](int it) {
      const int ti = it / chunks, c = it - ti * chunks;
      T* dst = sk + (it & 1) * kBlockK * L.k_stride;
      const int units = imin(kCols, p.dim_pad - c * kCols) / kVecT;
      KeySource src;
      if (ti < kt.total) {
        int origin[kMaxRank];
        key_tile_origin(kt, box, shape, ti, origin);
        src = window_source<kPeriodic>(nb, shape, y, p.y.layout, b, hk, qt.group, origin, box);
        load_key_tile<kPeriodic>(dst, L.k_stride, src, key_delta, key_packed, c * kCols, units, p.dim, p.y.layout.inner,
                                 p.y.vec, p.y.data, nb, p.y.layout);
      } else {
        const int m0 = slab.m0 + (ti - kt.total) * kBlockK;
        const int first[kMaxRank] = {0, 0, m0};
        src.base = y_extra + p.y_extra.layout.offset(b, first, hk);
        src.extra_rows = imin(kBlockK, slab.m1 - m0);
        src.wraps = false;
        load_key_tile<kPeriodic>(dst, L.k_stride, src, key_delta, key_packed, c * kCols, units, p.dim,
                                 p.y_extra.layout.inner, p.y_extra.vec, p.y_extra.data, nb, p.y_extra.layout);
      }
    };

    float s[kBlockK / 8][4];
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
      __syncthreads();  // stage `it` (and the query tile) landed; the slab tile is filled

      const int ti = it / chunks, c = it - ti * chunks;
      const bool extra_tile = ti >= kt.total;
      int origin[kMaxRank] = {0, 0, 0};
      int m_tile = 0;
      uint32_t active;
      if (!extra_tile) {
        key_tile_origin(kt, box, shape, ti, origin);
        active = window_chunks(shape, origin, wbox, warp_idle, lane);
      } else {
        m_tile = slab.m0 + (ti - kt.total) * kBlockK;
        active = extra_chunks(m_tile, slab.m1, warp_idle, lane);
      }
      if (c == 0) {
#pragma unroll
        for (int j = 0; j < kBlockK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
      }
      if (active) {
        const uint32_t k_stage = k_lane + uint32_t(it & 1) * k_stage_bytes;
        const int steps = imin(kCols, p.dim_pad - c * kCols) / Ops::kK;
        for (int ks = 0; ks < steps; ++ks) {
          const int col = c * kCols + ks * Ops::kK;
          const typename Ops::A a = Ops::load_a(q_lane + uint32_t(col * sizeof(T)));
#pragma unroll
          for (int pair = 0; pair < kBlockK / 16; ++pair) {
            if (((active >> (2 * pair)) & 3u) == 0) continue;
            typename Ops::B b0, b1;
            Ops::load_b_nk(k_stage + uint32_t((pair * 16 * L.k_stride + ks * Ops::kK) * sizeof(T)), b0, b1);
            Ops::mma_if((active >> (2 * pair)) & 1u, s[2 * pair], a, b0);
            Ops::mma_if((active >> (2 * pair + 1)) & 1u, s[2 * pair + 1], a, b1);
          }
        }
        if (c == chunks - 1) {
          // Scatter: element (row g + 8i, key 8j + 2t4 + e) of the warp's 16 x kBlockK scores.
#pragma unroll
          for (int j = 0; j < kBlockK / 8; ++j) {
            if (!((active >> j) & 1u)) continue;
            const int n = 8 * j + 2 * t4;
            if (!extra_tile) {
              int off[kMaxRank];
              shape.key_offset(n, off);  // keys n, n + 1: the same row of the tile, adjacent on axis 2
              const int k0 = origin[0] + off[0], k1 = origin[1] + off[1], k2 = origin[2] + off[2];
              const int code = k0 * ss0 + k1 * ss1 + k2;
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const RowSlab& R = rs[i];
                const bool outer = in(k0, R.key[0]) && in(k1, R.key[1]);
                const bool v0 = outer && in(k2, R.key[2]), v1 = outer && in(k2 + 1, R.key[2]);
                float x0 = p.alpha * s[j][2 * i], x1 = p.alpha * s[j][2 * i + 1];
                if (p.rpb) {
                  const int64_t ro =
                      rpb_row[i] + k0 * p.rpb_layout.axis[0] + k1 * p.rpb_layout.axis[1] + k2 * p.rpb_layout.axis[2];
                  if (v0)
                    x0 += p.rpb_float32 ? __ldg(static_cast<const float*>(p.rpb) + ro)
                                        : to_float(static_cast<const T*>(p.rpb)[ro]);
                  if (v1)
                    x1 += p.rpb_float32 ? __ldg(static_cast<const float*>(p.rpb) + ro + p.rpb_layout.axis[2])
                                        : to_float(static_cast<const T*>(p.rpb)[ro + p.rpb_layout.axis[2]]);
                }
                if (v0) tile[code - R.base] = x0;
                if (v1) tile[code - R.base + 1] = x1;
              }
            } else {
              const int m = m_tile + n;
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const RowSlab& R = rs[i];
                if (R.valid && m < slab.m1) tile[R.extra_base + m] = p.alpha * s[j][2 * i];
                if (R.valid && m + 1 < slab.m1) tile[R.extra_base + m + 1] = p.alpha * s[j][2 * i + 1];
              }
            }
          }
        }
      }
      __syncthreads();  // the next stage's loads overwrite this stage
    }
    ptx::cp_async_wait<0>();  // a slab with no key tiles still waited for nothing else
    __syncthreads();          // the slab tile is complete

    // ---- epilogue over whole rows (s_base == 0, s1 == W + M)
    if (p.slabs.whole_row() && p.epilogue != Epilogue::kStore) {
      const A* probs = static_cast<const A*>(p.probs);
      for (int r = warp; r < kBlockQ; r += kWarps) {
        if (row_out[r] < 0) continue;  // warp-uniform
        float* row = tile + r * L.tile_cols;
        if (p.epilogue == Epilogue::kSoftmax) {
          // Slots outside a causal window hold -inf (exp gives 0); every row has a
          // finite score (a query sees at least itself), so mx is finite.
          float mx = -INFINITY;
          for (int sl = lane; sl < slab.s1; sl += 32) mx = fmaxf(mx, row[sl]);
          mx = warp_max(mx);
          float sum = 0.f;
          for (int sl = lane; sl < slab.s1; sl += 32) sum += expf(row[sl] - mx);
          sum = warp_sum(sum);
          for (int sl = lane; sl < slab.s1; sl += 32) row[sl] = expf(row[sl] - mx) / sum;
          if (lane == 0 && p.lse) p.lse[row_lse[r]] = mx + logf(sum);
        } else {
          const A* prow = probs + row_out[r];
          const int64_t inner = p.out_layout.inner;
          float dot = 0.f;
          for (int sl = lane; sl < slab.s1; sl += 32) dot = fmaf(to_float(prow[sl * inner]), row[sl], dot);
          dot = warp_sum(dot);
          for (int sl = lane; sl < slab.s1; sl += 32) row[sl] = to_float(prow[sl * inner]) * (row[sl] - dot);
        }
      }
      __syncthreads();
    }

    // ---- store the slab's slots of every row; the row's last slab also fills its last
    // 16 bytes (workspace padding: NN loads it whole, initcheck sees it written)
    {
      A* const out = static_cast<A*>(p.out);
      const int64_t inner = p.out_layout.inner;
      const int end = slab.s1 == p.window + p.extra ? imin(round_up(slab.s1, kVecA), p.out_capacity) : slab.s1;
      const int units = ceil_div(end - s_base, kVecA);
      for (int idx = tid; idx < kBlockQ * units; idx += kThreads) {
        const int r = idx / units, u = idx - r * units;
        const int64_t ro = row_out[r];
        if (ro < 0) continue;
        const int first = s_base + u * kVecA;
        const float* src = tile + r * L.tile_cols + u * kVecA;
        A* dst = out + ro;
        if (p.out_vec && first >= slab.s0 && first + kVecA <= end) {
          store16<A>(dst + first, src);
        } else {
#pragma unroll
          for (int e = 0; e < kVecA; ++e) {
            const int sl = first + e;
            if (sl >= slab.s0 && sl < end) dst[sl * inner] = from_float<A>(src[e]);
          }
        }
      }
    }
    __syncthreads();  // the next slab refills the tile
  }
}

template <class T, class A, bool kPeriodic>
cudaError_t launch_pn_kernel(const PnParams& p, int64_t blocks, cudaStream_t stream) {
  auto kernel = pn_kernel<T, A, kPeriodic>;
  if (const cudaError_t err = allow_shared_memory<pn_kernel<T, A, kPeriodic>>(); err != cudaSuccess) return err;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (blocks == 0) return cudaSuccess;
  kernel<<<dim3(unsigned(blocks)), dim3(kThreads), p.smem.bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <class T, class A>
cudaError_t launch_pn(const PnParams& p, int64_t blocks, cudaStream_t stream) {
  const Neighborhood& nb = p.grid.nb;
  if (nb.axis[0].periodic || nb.axis[1].periodic || nb.axis[2].periodic)
    return launch_pn_kernel<T, A, true>(p, blocks, stream);
  return launch_pn_kernel<T, A, false>(p, blocks, stream);
}

#define NBHD_GEMM_PN(T, A) template cudaError_t launch_pn<T, A>(const PnParams&, int64_t, cudaStream_t);
NBHD_GEMM_IF_FLOAT16(NBHD_GEMM_PN(__half, float) NBHD_GEMM_PN(__half, __half))
NBHD_GEMM_IF_BFLOAT16(NBHD_GEMM_PN(__nv_bfloat16, float) NBHD_GEMM_PN(__nv_bfloat16, __nv_bfloat16))
NBHD_GEMM_IF_FLOAT32(NBHD_GEMM_PN(float, float))
#undef NBHD_GEMM_PN

}  // namespace nbhd::cuda::gemm
