// SPDX-License-Identifier: Apache-2.0
// The backward's dq pass for small windows (issue 20), on the halo forward's parts
// (halo_parts.cuh): a CTA loads its query tile's Q and dO rows and the tile's key box
// (K and V) once, and each warp computes, over its own windows' union in steps of 8-key
// blocks,
//   S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K,
// dQ kept in registers and written once: no float32 workspace, no atomics (so it is
// deterministic too). mma.sync, 16-bit, head dims 32 and 64; lse and delta come from
// the preprocess (BackwardParams::lse_delta).
#pragma once

#include "cuda/fused/backward_params.hpp"
#include "cuda/fused/backward_parts.cuh"
#include "cuda/fused/halo_parts.cuh"

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_>
struct HaloDqConfig {
  using Element = T;
  static_assert(sizeof(T) == 2, "the halo dq pass is 16-bit");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;  // the backward's CTAs (kBackwardWarps), its table entries
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockQ = 16 * kWarps;
  // Q and dO fragments, S and dP of a step, dQ: 168 registers at 3 CTAs per SM (the
  // tiled dq pass's), no spills at head dims 32 and 64; 4 CTAs (128 registers) spilled
  // 20 bytes at 32 (ptxas, sm_90a).
  static constexpr int kMinBlocksPerSM = 3;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_backward_dq_halo_kernel(const __grid_constant__ BackwardParams p) {
  using T = typename Cfg::Element;
  constexpr int kHeadDim = Cfg::kHeadDim, kStep = halo::kStepBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* dout_smem = q_smem + Cfg::kBlockQ * kHeadDim;
  T* k_smem = dout_smem + Cfg::kBlockQ * kHeadDim;
  T* v_smem = k_smem + (p.dq_halo_rows + kHaloSlackRows) * kHeadDim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const TileShape shape{{p.dq_shape.row_log2[0], p.dq_shape.row_log2[1], p.dq_shape.row_log2[2]},
                        {p.dq_shape.warp_log2[0], p.dq_shape.warp_log2[1], p.dq_shape.warp_log2[2]},
                        {0, 0, 0}};

  halo::Tile t;
  {
    int64_t linear = blockIdx.x;
    const int64_t tile = linear % p.dq_tiles;
    linear /= p.dq_tiles;
    t.h = int(linear % p.heads);
    t.b = linear / p.heads;
    t.hk = t.h / p.heads_per_kv;
    if (!detail_bwd::decode_query_tile(p, p.dq_tiles_per_group, p.dq_shape.row_log2, tile, t.group, t.origin, t.end, t.lg))
      return;
  }
  halo::set_key_box(p.nb, shape, t);

  // ---- loads: Q and dO of the tile, the halo; the warp's keys, lse and delta ------
  halo::load_query_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.q), p.q_layout, p.dim,
                                                 Cfg::kBlockQ, q_smem);
  halo::load_query_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.d_out), p.dout_layout,
                                                 p.dim_v, Cfg::kBlockQ, dout_smem);
  halo::load_halo<kHeadDim, Cfg::kThreads>(p.nb, t, static_cast<const T*>(p.k), p.k_layout, p.dim,
                                           static_cast<const T*>(p.v), p.v_layout, p.dim_v, k_smem, v_smem);
  ptx::cp_async_commit();
  halo::WarpKeys w = halo::warp_keys(p.nb, shape, t, p.rpb_layout, warp, lane);
  float row_lse[2], row_delta[2];  // rows past the group's queries: zeros, masked anyway
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int token[kMaxRank];
    token_of(p.nb, t.group, t.lg, w.row_j[i], token);
    const float2 ld = w.row_valid[i] ? reinterpret_cast<const float2*>(p.lse_delta)[(t.b * p.heads + t.h) * p.tokens +
                                                                                   detail_bwd::flat_token(p, token)]
                                     : make_float2(0.f, 0.f);
    row_lse[i] = ld.x;
    row_delta[i] = ld.y;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the tile and its halo landed; no barrier follows
  if (w.idle) return;

  typename Mma<T>::A qa[kHeadDim / 16], da[kHeadDim / 16];
  halo::load_row_fragments<kHeadDim>(qa, q_smem, warp, lane);
  halo::load_row_fragments<kHeadDim>(da, dout_smem, warp, lane);
  const uint32_t k_rows = ptx::smem_address(k_smem), v_rows = ptx::smem_address(v_smem);
  float dq[kHeadDim / 8][4];
#pragma unroll
  for (int d = 0; d < kHeadDim / 8; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[d][e] = 0.f;

  for (int first = 0; first < w.blocks; first += kStep) {
    const halo::BlockWalk step_start = w.walk;
    int block_row[kStep];
    const uint32_t attended = halo::step_blocks(w, first, block_row);
    float s[kStep][4], dp[kStep][4];
    halo::block_scores<kHeadDim, T>(s, qa, k_rows, block_row, lane);
    halo::scale_mask_bias<T>(s, attended, p.scale_log2, p.rpb, p.rpb_is_float32, p.rpb_layout, w, step_start);
    halo::block_scores<kHeadDim, T>(dp, da, v_rows, block_row, lane);
    // dS = P (dP - delta), P = exp2(score - lse) (masked scores: exact zeros).
#pragma unroll
    for (int j = 0; j < kStep; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = ptx::exp2_approx(s[j][e] - row_lse[e >> 1]) * (dp[j][e] - row_delta[e >> 1]);
    halo::block_accumulate<kHeadDim, T>(dq, s, k_rows, block_row, lane);
  }

  // ---- epilogue: dQ = scale * sum dS K, staged through this warp's rows of Q -------
  const float scale[2] = {p.scale, p.scale};
  halo::store_rows<kHeadDim>(dq, scale, q_smem, p.nb, shape, t, static_cast<T*>(p.d_q), p.dq_layout, p.dim, warp, lane);
}

template <class T, int kHeadDim>
cudaError_t launch_fused_backward_dq_halo(const BackwardParams& p, cudaStream_t stream) {
  using Cfg = HaloDqConfig<T, kHeadDim>;
  if (const cudaError_t e = allow_shared_memory<fused_backward_dq_halo_kernel<Cfg>>(kHaloMaxSharedBytes); e != cudaSuccess)
    return e;
  const int64_t blocks = p.dq_tiles * p.heads * p.batch;
  const int bytes = halo_shared_bytes(2 * Cfg::kBlockQ, kHeadDim, p.dq_halo_rows);
  fused_backward_dq_halo_kernel<Cfg><<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
