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
  const TileShape shape = p.dq_shape.row_shape();

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
  halo::load_tile_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.q), p.q_layout, t.h, p.dim,
                                                Cfg::kBlockQ, q_smem);
  halo::load_tile_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.d_out), p.dout_layout, t.h,
                                                p.dim_v, Cfg::kBlockQ, dout_smem);
  halo::load_halo<kHeadDim, Cfg::kThreads>(p.nb, t, t.hk, static_cast<const T*>(p.k), p.k_layout, p.dim,
                                           static_cast<const T*>(p.v), p.v_layout, p.dim_v, k_smem, v_smem);
  ptx::cp_async_commit();
  halo::WarpKeys w = halo::warp_keys(p.nb, shape, t, p.rpb_layout, t.h, /*rpb_sign=*/1, warp, lane,
                                     [&](int a, int j) { return p.nb.axis[a].window(j, t.lg[a]); });
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
    halo::scale_mask_bias(s, attended, p.scale_log2, p.rpb != nullptr, p.rpb_layout, w, step_start,
                            halo::GlobalBias<T>{p.rpb, p.rpb_is_float32});
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
  halo::store_rows<kHeadDim>(dq, scale, q_smem, p.nb, shape, t, static_cast<T*>(p.d_q), p.dq_layout, t.h, p.dim, warp,
                             lane);
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

// The key pass for small windows, transposed: a 4-warp CTA holds a key tile (a box of
// one dilation group) of one kv head with its K and V rows; its halo is the tile's
// query box (the union of its keys' inverse windows, clipped to the computed
// queries). For each query head of the kv head's group it loads the halo's Q and dO
// rows with their lse and delta, and each warp computes, over the union of its own
// keys' inverse windows in 8-query blocks,
//   S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta), dK += dS^T Q,
// dK and dV in registers across the heads, written once. With an rpb, the head's bias
// table sits in shared memory, compact ([2 k - 1] per axis); d rpb (default mode) is
// binned there by shared atomics, then added by one global atomic per bin and head.
// Deterministic d rpb and additional tokens stay on the tiled key pass
// (halo_key_entry).
template <class T, int kHeadDim_>
struct HaloKeyConfig {
  using Element = T;
  static_assert(sizeof(T) == 2, "the halo key pass is 16-bit");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockK = 16 * kWarps;
  // K and V fragments, S^T and dP^T of a step, dK and dV: 2 CTAs per SM at head dim 64
  // (255 registers), 3 at 32 (168).
  static constexpr int kMinBlocksPerSM = kHeadDim == 32 ? 3 : 2;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_backward_key_halo_kernel(const __grid_constant__ BackwardParams p) {
  using T = typename Cfg::Element;
  constexpr int kHeadDim = Cfg::kHeadDim, kStep = halo::kStepBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_smem = reinterpret_cast<T*>(smem_raw);
  T* v_smem = k_smem + Cfg::kBlockK * kHeadDim;
  T* q_smem = v_smem + Cfg::kBlockK * kHeadDim;
  T* dout_smem = q_smem + (p.kv_halo_rows + kHaloSlackRows) * kHeadDim;
  float2* lse_delta = reinterpret_cast<float2*>(dout_smem + (p.kv_halo_rows + kHaloSlackRows) * kHeadDim);
  // The bias table and the d rpb bins of a head, compact: bin (x0, x1, x2) at
  // (x0 (2 k1 - 1) + x1) (2 k2 - 1) + x2, x = key - query + kernel - 1 per axis.
  const bool has_bias = p.rpb != nullptr, bias_gradient = p.d_rpb != nullptr;
  detail::RpbLayout bins{};
  bins.axis[2] = 1;
  bins.axis[1] = 2 * p.nb.axis[2].kernel - 1;
  bins.axis[0] = bins.axis[1] * (2 * p.nb.axis[1].kernel - 1);
  const int bin_count = int(bins.axis[0]) * (2 * p.nb.axis[0].kernel - 1);
  float* bias_table = reinterpret_cast<float*>(lse_delta + p.kv_halo_rows + kHaloSlackRows);
  float* bias_bins = bias_table + bin_count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t4 = lane & 3;
  const TileShape shape = p.kv_shape.row_shape();

  halo::Tile t;
  {
    int64_t linear = blockIdx.x;
    const int64_t tile = linear % p.kv_tiles;
    linear /= p.kv_tiles;
    t.hk = int(linear % p.kv_heads);
    t.b = linear / p.kv_heads;
    t.h = t.hk * p.heads_per_kv;
    if (!detail_bwd::decode_tile(p.nb, p.kv_tiles_per_group, p.kv_shape.row_log2, tile, t.group, t.origin, t.lg)) return;
  }
  // The halo: the keys' inverse-window union, inside the computed queries (the union
  // of clipped windows can reach past them where they are empty).
  const detail_bwd::Box queries = detail_bwd::key_tile_queries(p, t.group, t.origin, t.lg);
  t.rows = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    t.end[a] = t.lg[a];
    const Range part = detail_bwd::computed_queries(p, a, t.group[a], {queries.r[a].begin, queries.r[a].end});
    t.halo[a] = {part.begin, imax(part.begin, part.end)};
    t.rows *= t.halo[a].size();
  }
  auto inverse_window = [&](int a, int j) {
    return detail_bwd::computed_queries(p, a, t.group[a], p.nb.axis[a].inverse_window(j, t.lg[a]));
  };

  halo::load_tile_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.k), p.k_layout, t.hk, p.dim,
                                                Cfg::kBlockK, k_smem);
  halo::load_tile_rows<kHeadDim, Cfg::kThreads>(p.nb, shape, t, static_cast<const T*>(p.v), p.v_layout, t.hk, p.dim_v,
                                                Cfg::kBlockK, v_smem);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();  // K and V landed (their fragments stay in registers over the heads)
  typename Mma<T>::A ka[kHeadDim / 16], va[kHeadDim / 16];
  halo::load_row_fragments<kHeadDim>(ka, k_smem, warp, lane);
  halo::load_row_fragments<kHeadDim>(va, v_smem, warp, lane);
  float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];
#pragma unroll
  for (int d = 0; d < kHeadDim / 8; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;
  const uint32_t q_rows = ptx::smem_address(q_smem), dout_rows = ptx::smem_address(dout_smem);
  bool idle = false;

  for (int head = 0; head < p.heads_per_kv; ++head) {
    t.h = t.hk * p.heads_per_kv + head;
    if (head > 0) __syncthreads();  // every warp is done with the previous head's halo
    // ---- the halo of this head: Q and dO rows, lse and delta per row -----------------
    if (t.rows > 0)
      halo::load_halo<kHeadDim, Cfg::kThreads>(p.nb, t, t.h, static_cast<const T*>(p.q), p.q_layout, p.dim,
                                               static_cast<const T*>(p.d_out), p.dout_layout, p.dim_v, q_smem, dout_smem);
    ptx::cp_async_commit();
    const float2* rows_lse_delta = reinterpret_cast<const float2*>(p.lse_delta) + (t.b * p.heads + t.h) * p.tokens;
    const int halo1 = imax(t.halo[1].size(), 1), halo2 = imax(t.halo[2].size(), 1);
    for (int r = threadIdx.x; r < t.rows + kHaloSlackRows; r += Cfg::kThreads) {
      float2 ld = make_float2(0.f, 0.f);  // slack rows: masked anyway
      if (r < t.rows) {
        const int r01 = r / halo2;
        const int j[kMaxRank] = {t.halo[0].begin + r01 / halo1, t.halo[1].begin + r01 % halo1, t.halo[2].begin + r % halo2};
        int token[kMaxRank];
        token_of(p.nb, t.group, t.lg, j, token);
        ld = rows_lse_delta[detail_bwd::flat_token(p, token)];
      }
      lse_delta[r] = ld;
    }
    if (has_bias || bias_gradient)
      for (int i = threadIdx.x; i < bin_count; i += Cfg::kThreads) {
        const int x2 = i % int(bins.axis[1]), x1 = i / int(bins.axis[1]) % (2 * p.nb.axis[1].kernel - 1),
                  x0 = i / int(bins.axis[0]);
        bias_table[i] = has_bias ? halo::GlobalBias<T>{p.rpb, p.rpb_is_float32}(
                                       int64_t(t.h) * p.rpb_layout.head + x0 * p.rpb_layout.axis[0] +
                                       x1 * p.rpb_layout.axis[1] + x2 * p.rpb_layout.axis[2])
                                 : 0.f;
        bias_bins[i] = 0.f;
      }
    halo::WarpKeys w = halo::warp_keys(p.nb, shape, t, bins, /*rpb_head=*/0, /*rpb_sign=*/-1, warp, lane, inverse_window);
    idle = w.idle;
    ptx::cp_async_wait<0>();
    __syncthreads();  // the halo, its lse and delta, and the bias table landed

    for (int first = 0; first < (w.idle ? 0 : w.blocks); first += kStep) {
      const halo::BlockWalk step_start = w.walk;
      int block_row[kStep];
      const uint32_t attended = halo::step_blocks(w, first, block_row);
      float s[kStep][4], dp[kStep][4];
      halo::block_scores<kHeadDim, T>(s, ka, q_rows, block_row, lane);
      halo::scale_mask_bias(s, attended, p.scale_log2, has_bias, bins, w, step_start,
                            [&](int64_t o) { return bias_table[o]; });
      // P^T = exp2(score - lse of the column's query); masked scores give exact zeros.
      float delta[kStep][2];
#pragma unroll
      for (int j = 0; j < kStep; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float2 ld = lse_delta[block_row[j] + 2 * t4 + e];
          delta[j][e] = ld.y;
          s[j][e] = ptx::exp2_approx(s[j][e] - ld.x);
          s[j][2 + e] = ptx::exp2_approx(s[j][2 + e] - ld.x);
        }
      halo::block_accumulate<kHeadDim, T>(dv, s, dout_rows, block_row, lane);
      halo::block_scores<kHeadDim, T>(dp, va, dout_rows, block_row, lane);
#pragma unroll
      for (int j = 0; j < kStep; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - delta[j][e & 1];
      if (bias_gradient)
        halo::for_each_bias(attended, bins, w, step_start, [&](int j, int e, int64_t o) { atomicAdd(&bias_bins[o], s[j][e]); });
      halo::block_accumulate<kHeadDim, T>(dk, s, q_rows, block_row, lane);
    }
    if (bias_gradient) {
      __syncthreads();  // every warp's dS is binned
      for (int i = threadIdx.x; i < bin_count; i += Cfg::kThreads) {
        if (bias_bins[i] == 0.f) continue;
        const int x2 = i % int(bins.axis[1]), x1 = i / int(bins.axis[1]) % (2 * p.nb.axis[1].kernel - 1),
                  x0 = i / int(bins.axis[0]);
        atomicAdd(p.d_rpb + int64_t(t.h) * p.drpb_layout.head + x0 * p.drpb_layout.axis[0] + x1 * p.drpb_layout.axis[1] +
                      x2 * p.drpb_layout.axis[2],
                  bias_bins[i]);
      }
    }
  }

  // ---- epilogue: dK = scale * sum dS^T Q and dV, staged through the warp's own rows ----
  if (idle) return;
  const float scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  halo::store_rows<kHeadDim>(dk, scale, k_smem, p.nb, shape, t, static_cast<T*>(p.d_k), p.dk_layout, t.hk, p.dim, warp,
                             lane);
  halo::store_rows<kHeadDim>(dv, one, v_smem, p.nb, shape, t, static_cast<T*>(p.d_v), p.dv_layout, t.hk, p.dim_v, warp,
                             lane);
}

template <class T, int kHeadDim>
cudaError_t launch_fused_backward_key_halo(const BackwardParams& p, cudaStream_t stream) {
  using Cfg = HaloKeyConfig<T, kHeadDim>;
  if (const cudaError_t e = allow_shared_memory<fused_backward_key_halo_kernel<Cfg>>(kHaloMaxSharedBytes); e != cudaSuccess)
    return e;
  const int64_t blocks = int64_t(p.batch) * p.kv_heads * p.kv_tiles;
  const int bins = (2 * p.nb.axis[0].kernel - 1) * (2 * p.nb.axis[1].kernel - 1) * (2 * p.nb.axis[2].kernel - 1);
  const int bytes =
      halo_key_pass_shared_bytes(Cfg::kBlockK, kHeadDim, p.kv_halo_rows, p.rpb || p.d_rpb ? bins : 0);
  fused_backward_key_halo_kernel<Cfg><<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
