// SPDX-License-Identifier: Apache-2.0
// Fused forward for small windows (issue 20: NAT, DiNAT, StyleNAT; windows up to ~13
// per axis, head dims up to 64), mma.sync (sm_80+), 16-bit.
//
// The tiled kernel (forward_kernel.cuh) walks a CTA's key box in key tiles and, per
// tile and warp, loads, decides and masks: on NAT's 56² grid with 7x7 windows at head
// dim 32 it executes ~5,500 warp instructions per 16 queries for their 784 attended
// pairs, at half the issue slots (ncu, H100; docs/performance.md, "Small windows").
// Here a CTA loads its query tile and the tile's halo (the union of its queries'
// windows: the key box, at most q + kernel + stride - 2 keys per axis) into shared
// memory once, behind one barrier, and each warp then computes its 16 queries against
// the union of its own windows only (halo_parts.cuh): no key tiles, stages or per-tile
// decisions; the mask is one unsigned compare per row and outer axis per block and one
// per score on the innermost axis.
#pragma once

#include "cuda/fused/forward_kernel.cuh"
#include "cuda/fused/halo_parts.cuh"

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_, int kWarps_>
struct HaloForwardConfig {
  using Element = T;
  static_assert(sizeof(T) == 2, "the halo kernel is 16-bit");
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockQ = 16 * kWarps;
  // Register budget: 128 per thread at 4 CTAs of 4 warps or 2 of 8 (the tiled
  // head-dim-32 kernel's, 4 CTAs of 4 warps: 128 registers); head dim 64 with 4 warps
  // 168 at 3 CTAs, which its shared memory allows anyway (NAT's 14x14 keys: 60 KB).
  static constexpr int kMinBlocksPerSM = kWarps == 8 ? 2 : kHeadDim == 32 ? 4 : 3;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_forward_halo_kernel(const __grid_constant__ ForwardParams p) {
  using T = typename Cfg::Element;
  constexpr int kHeadDim = Cfg::kHeadDim, kStep = halo::kStepBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* k_smem = q_smem + Cfg::kBlockQ * kHeadDim;
  T* v_smem = k_smem + (p.halo_rows + kHaloSlackRows) * kHeadDim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  detail_fwd::QueryTile qt;
  if (!detail_fwd::locate_query_tile(p, blockIdx.x, qt)) return;
  halo::Tile t;
  t.b = qt.b;
  t.h = qt.h;
  t.hk = qt.hk;
  for (int a = 0; a < kMaxRank; ++a) {
    t.group[a] = qt.group[a];
    t.lg[a] = qt.lg[a];
    t.origin[a] = qt.origin[a];
    t.end[a] = qt.end[a];
  }
  halo::set_key_box(p.nb, p.shape, t);

  // ---- loads: the query tile and the halo, once; the warp's keys while they fly ----
  halo::load_tile_rows<kHeadDim, Cfg::kThreads>(p.nb, p.shape, t, static_cast<const T*>(p.q), p.q_layout, t.h, p.dim,
                                                Cfg::kBlockQ, q_smem);
  halo::load_halo<kHeadDim, Cfg::kThreads>(p.nb, t, t.hk, static_cast<const T*>(p.k), p.k_layout, p.dim,
                                           static_cast<const T*>(p.v), p.v_layout, p.dim_v, k_smem, v_smem);
  ptx::cp_async_commit();
  halo::WarpKeys w = halo::warp_keys(p.nb, p.shape, t, p.rpb_layout, t.h, /*rpb_sign=*/1, warp, lane,
                                     [&](int a, int j) { return p.nb.axis[a].window(j, t.lg[a]); });
  ptx::cp_async_wait<0>();
  __syncthreads();  // the tile and its halo landed; no barrier follows
  if (w.idle) return;

  typename Mma<T>::A qa[kHeadDim / 16];
  halo::load_row_fragments<kHeadDim>(qa, q_smem, warp, lane);
  const uint32_t k_rows = ptx::smem_address(k_smem), v_rows = ptx::smem_address(v_smem);
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int d = 0; d < kHeadDim / 8; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float row_max[2] = {detail_fwd::kNegInf, detail_fwd::kNegInf}, row_sum[2] = {0.f, 0.f};

  for (int first = 0; first < w.blocks; first += kStep) {
    const halo::BlockWalk step_start = w.walk;
    int block_row[kStep];
    const uint32_t attended = halo::step_blocks(w, first, block_row);
    float s[kStep][4];
    halo::block_scores<kHeadDim, T>(s, qa, k_rows, block_row, lane);
    halo::scale_mask_bias(s, attended, p.scale_log2, p.rpb != nullptr, p.rpb_layout, w, step_start,
                            halo::GlobalBias<T>{p.rpb, p.rpb_is_float32});
    float rescale[2];
    detail_fwd::online_softmax(s, row_max, row_sum, 1.f, rescale);
    detail_fwd::rescale_o(o, rescale);
    halo::block_accumulate<kHeadDim, T>(o, s, v_rows, block_row, lane);
  }

  // ---- epilogue: out = O / sum, staged through this warp's rows of the query tile ----
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = detail_fwd::quad_sum(row_sum[i]);
    inv[i] = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
  }
  halo::store_rows<kHeadDim>(o, inv, q_smem, p.nb, p.shape, t, static_cast<T*>(p.out), p.out_layout, t.h, p.dim_v, warp,
                             lane);
  if (p.lse && (lane & 3) == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!w.row_valid[i]) continue;
      int token[kMaxRank];
      token_of(p.nb, t.group, t.lg, w.row_j[i], token);
      p.lse[p.lse_layout.offset(t.b, token, t.h)] = (row_max[i] + log2f(row_sum[i])) * kLn2;
    }
  }
}

template <class Cfg>
cudaError_t launch_fused_forward_halo(const ForwardParams& p, int64_t batch, cudaStream_t stream) {
  auto kernel = fused_forward_halo_kernel<Cfg>;
  if (const cudaError_t e = allow_shared_memory<fused_forward_halo_kernel<Cfg>>(kHaloMaxSharedBytes); e != cudaSuccess)
    return e;
  const int64_t blocks = p.tiles * p.heads * batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int bytes = halo_shared_bytes(Cfg::kBlockQ, Cfg::kHeadDim, p.halo_rows);
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
