// SPDX-License-Identifier: Apache-2.0
// Fused neighborhood attention backward on tensor cores (mma.sync, sm_80+: m16n8k16
// for float16 / bfloat16; for float32 three tf32 m16n8k8 products per product,
// common/mma.cuh, as the forward's).
//
// Passes, launched in order by launch_fused_backward (bottom of this file):
//  1. preprocess: lse_delta[b, h, token] = {lse * log2(e), rowsum(dO * out) - d lse}
//     (lse's gradient, where the loss uses lse, folds into delta: BackwardTensors::d_lse).
//  2. key pass: one CTA per key tile (a box of one dilation group) and kv head. The
//     queries whose windows hold its keys form a box (the inverse-window union); the
//     CTA walks it in query tiles, for each query head of its GQA group, computing
//       S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T,
//       dS^T = P^T (dP^T - delta), dK += dS^T Q
//     with keys in the mma M dimension (16 per warp, each warp a box) and P^T, dS^T
//     kept in registers. Per warp, 8-query chunks outside the union of its keys'
//     inverse windows are predicated off and the element mask runs only on tiles not
//     inside their intersection: the forward's scheme, transposed. dK and dV are
//     written once. dS^T also goes to shared memory, where all warps turn it into
//     dQ = dS K for the tile and add it to a float32 workspace by atomics, unless
//     the dq pass computes dQ (deterministic mode; windows of <= 128 keys by
//     default, see backward_plan.hpp). Additional tokens get CTAs of their own (64
//     tokens, one kv head) that walk every query tile with bounds masks only.
//  3. the float32 dQ sums -> d_query; or the dq pass, a query-tile kernel in the
//     forward's orientation that recomputes P and dP and keeps dQ in registers. In
//     deterministic mode, a fixed-order reduction of the key pass's d rpb sums.
// docs/fused_backward.md has the costs of each choice.
// d rpb: per (key tile, query tile) pair, dS^T (float32) is binned by relative
// position in shared memory, each bin summed by one thread in a fixed order, then
// added to d_rpb by one atomic per bin (default) or to the CTA's slice of a
// workspace that pass 3 reduces (deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/shared_memory.hpp"
#include "cuda/fused/backward.hpp"
#include "cuda/fused/backward_halo_kernel.cuh"
#include "cuda/fused/backward_params.hpp"
#include "cuda/fused/backward_parts.cuh"
#include "cuda/fused/backward_ptx.cuh"
#include "cuda/fused/backward_wgmma_kernel.cuh"

namespace nbhd::cuda::fused {

// ---------------------------------------------------------------------------------
// Key pass configuration. Rows are keys (16 per warp), columns queries.
template <class T, int kHeadDim_, int kWarps_, int kBlockCols_, int kSubCols_>
struct KeyPassConfig {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockRows = 16 * kWarps;  // keys per CTA
  static constexpr int kBlockCols = kBlockCols_;  // queries per tile
  // Queries per register pass: S^T and dP^T of kSubCols columns are live at once
  // (2 * kSubCols / 2 floats per thread) on top of dK and dV (kHeadDim floats); at
  // head dim 128 a full 64-query pass would need ~290 registers.
  static constexpr int kSubCols = kSubCols_;
  static constexpr bool kTf32 = sizeof(T) == 4;     // float32: three tf32 products per product
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;   // 16-byte chunks per row
  static constexpr int kColBlocks = kBlockCols / 8;  // n8 blocks (8-query chunks) of a tile
  static constexpr int kDsChunks = kBlockCols / kVec;  // 16-byte chunks of a dS^T row
  static constexpr int kSubBlocks = kSubCols / 8;
  static constexpr int kDBlocks = kHeadDim / 8;
  static constexpr int kQBlocks = kBlockCols / 16;  // 16-query blocks of the dQ = dS K product
  // CTAs per SM the register budget must allow (255 / 168 registers at 4 warps):
  // ptxas -v with 32-query passes, sm_90a: 254 registers at head dim 128, 168 at 64,
  // 162 at 32, no spills (4 CTAs at 32 would spill 60 bytes). Shared memory allows
  // 2 CTAs per SM at head dim 128 (~106 KB each). float32 tiles take twice the
  // shared memory: 2 CTAs per SM at most on an H100.
  static constexpr int kMinBlocksPerSM = kTf32 ? 2 : kHeadDim <= 64 ? 3 : 2;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "key pass head dim bucket must be 32, 64 or 128");
  static_assert(kBlockCols % kSubCols == 0 && kSubCols % 16 == 0, "register passes of whole k16 steps");
  static_assert(kWarps % kQBlocks == 0, "the dQ product splits 16-query blocks x head-dim parts over warps");
  static_assert((kHeadDim / 16) % (kWarps / kQBlocks) == 0, "head-dim parts of the dQ product");

  struct SharedStorage {
    T k[kBlockRows * kHeadDim];  // reused to stage dK at the end
    T v[kBlockRows * kHeadDim];  // reused to stage dV
    // Two stages: query tile it + 1 loads while tile it computes.
    T q[2][kBlockCols * kHeadDim];
    T dout[2][kBlockCols * kHeadDim];
    T ds[kBlockRows * kBlockCols];  // dS^T [key][query] in T, swizzled, for dQ = dS K
    alignas(16) float2 lse_delta[2][kBlockCols];
    // Per query-tile column: element offsets from the tile origin's row in q and dO,
    // token offset in the workspaces, offsets in the tile box (axis a in bits 10a..).
    int64_t q_col_delta[kBlockCols];
    int64_t dout_col_delta[kBlockCols];
    int token_col_delta[kBlockCols];
    int col_offset[kBlockCols];
    // Per key row and axis: its group index and inverse window {j, begin, end, 0};
    // an empty window marks a row past the grid (additional tokens: {m, 0, valid}).
    int4 row_axis[kBlockRows][kMaxRank];
    // Per warp and axis: {union begin, union end, intersection begin, intersection
    // end} of its keys' inverse windows.
    int4 warp_box[kWarps][kMaxRank];
    uint32_t warp_active[kWarps];  // this tile's active 8-query chunks per warp
    WalkAxis walk[kMaxRank];       // the query walk per axis (query_tile)
    int rpb_lo[kMaxRank];          // d rpb: the CTA's first bias index per axis
    int rpb_hi[kMaxRank];          //        and one past its last
  };
  // With d rpb, dS^T in float32 follows SharedStorage: [key][query + 8] (the pad
  // makes the 64-bit stores of a half warp hit 32 distinct banks).
  static constexpr int kDs32Stride = kBlockCols + 8;
  static constexpr int kRpbBytes = kBlockRows * kDs32Stride * 4;
  static constexpr int kSharedBytes = int(sizeof(SharedStorage));

  __device__ static constexpr int chunk_index(int r, int c) { return r * kChunks + (c ^ detail_bwd::swizzle(kChunks, r)); }
  __device__ static constexpr int col_chunk_index(int r, int c) { return chunk_index(r, c); }  // Q and dO tiles
  __device__ static constexpr int ds_index(int r, int c) { return r * kDsChunks + (c ^ detail_bwd::swizzle(kDsChunks, r)); }
  // Element (r, col) of a head-dim tile (K, V, Q, dO) and of dS^T.
  __device__ static constexpr int element_index(int r, int col) { return chunk_index(r, col / kVec) * kVec + col % kVec; }
  __device__ static constexpr int ds_element_index(int r, int col) { return ds_index(r, col / kVec) * kVec + col % kVec; }
  static constexpr int kRowBytes = kChunks * 16;
  static constexpr int kDsRowBytes = kDsChunks * 16;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_backward_key_kernel(const __grid_constant__ BackwardParams p) {
  using T = typename Cfg::Element;
  using Mma = nbhd::cuda::Mma<T>;
  using detail_bwd::Box;
  using detail_bwd::kNegInf;
  constexpr int kRows = Cfg::kBlockRows, kCols = Cfg::kBlockCols, kChunks = Cfg::kChunks;
  constexpr int kDBlocks = Cfg::kDBlocks, kSubBlocks = Cfg::kSubBlocks, kColBlocks = Cfg::kColBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const GridTile& shape = p.kv_shape;
  const Neighborhood& nb = p.nb;

  // ---- which CTA: additional-token CTAs first (they walk every query) -------------
  int64_t linear = blockIdx.x;
  const int64_t additional_blocks = int64_t(p.batch) * p.kv_heads * p.additional_ctas;
  const bool additional = linear < additional_blocks;
  int64_t tile = 0;
  int m0 = 0;
  if (additional) {
    m0 = int(linear % p.additional_ctas) * kRows;
    linear /= p.additional_ctas;
  } else {
    linear -= additional_blocks;
    tile = linear % p.kv_tiles;
    linear /= p.kv_tiles;
  }
  const int hk = int(linear % p.kv_heads);
  const int64_t b = linear / p.kv_heads;

  int group[kMaxRank] = {0, 0, 0}, lg[kMaxRank] = {1, 1, 1}, k_origin[kMaxRank] = {0, 0, 0};
  Box qbox{};  // the queries of this key tile (neighborhood CTAs)
  if (!additional) {
    if (!detail_bwd::decode_tile(nb, p.kv_tiles_per_group, shape.row_log2, tile, group, k_origin, lg)) return;
    qbox = detail_bwd::key_tile_queries(p, group, k_origin, lg);
  }

  int tiles_per_head = p.additional_col_tiles;
  if (!additional) {
    tiles_per_head = 1;
    for (int a = 0; a < kMaxRank; ++a) tiles_per_head *= ceil_div(qbox.r[a].size(), shape.col(a));
  }
  const int total_tiles = tiles_per_head * p.heads_per_kv;

  // ---- per-CTA tables ---------------------------------------------------------------
  detail_bwd::fill_col_tables(p, smem, kCols, tid, Cfg::kThreads);
  if (tid == 0)
    for (int a = 0; a < kMaxRank; ++a)
      smem.walk[a] = additional ? WalkAxis{p.query_begin[a], p.query_end[a],
                                           all_groups_tiles(nb.axis[a], shape.col(a), p.query_begin[a], p.query_end[a]), -1}
                                : WalkAxis{qbox.r[a].begin, qbox.r[a].end, ceil_div(qbox.r[a].size(), shape.col(a)), group[a]};
  const bool rpb_grad = p.d_rpb != nullptr && !additional;
  float* rpb_slot = nullptr;  // deterministic d rpb: this CTA's partial sums, all heads of the group
  int rpb_slot_size = 0;
  if (rpb_grad) {
    if (tid == 0)
      for (int a = 0; a < kMaxRank; ++a) {
        const Range span = key_tile_rpb_span(nb.axis[a], lg[a], k_origin[a], shape.row(a));
        smem.rpb_lo[a] = span.begin;
        smem.rpb_hi[a] = span.end;
      }
    if (p.rpb_partial) {
      rpb_slot_size = p.rpb_span[0] * p.rpb_span[1] * p.rpb_span[2];
      const int64_t cta = (b * p.kv_heads + hk) * p.kv_tiles + tile;
      rpb_slot = p.rpb_partial + cta * p.heads_per_kv * rpb_slot_size;
      for (int i = tid; i < p.heads_per_kv * rpb_slot_size; i += Cfg::kThreads) rpb_slot[i] = 0.f;
    }
  }

  // ---- this CTA's keys: K and V rows, and each row's inverse window ---------------
  auto key_row = [&](int r, int* token) {  // false for a row past the grid / past M
    if (additional) {
      token[0] = token[1] = 0;
      token[2] = m0 + r;
      return m0 + r < p.additional_tokens;
    }
    int j[kMaxRank];
    return detail_bwd::neighborhood_key_row(p, group, k_origin, lg, r, j, token);
  };
  {
    const T* k_src = static_cast<const T*>(additional ? p.additional_k : p.k);
    const T* v_src = static_cast<const T*>(additional ? p.additional_v : p.v);
    const detail::TokenLayout& kl = additional ? p.ak_layout : p.k_layout;
    const detail::TokenLayout& vl = additional ? p.av_layout : p.v_layout;
    for (int idx = tid; idx < kRows * kChunks; idx += Cfg::kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      int token[kMaxRank];
      const bool valid = key_row(r, token);
      const int col = c * Cfg::kVec;
      const bool k_ok = valid && col < p.dim, v_ok = valid && col < p.dim_v;
      ptx::cp_async_16(ptx::smem_address(&smem.k[Cfg::chunk_index(r, c) * Cfg::kVec]),
                       k_ok ? k_src + kl.offset(b, token, hk) + col : k_src, k_ok ? 16 : 0);
      ptx::cp_async_16(ptx::smem_address(&smem.v[Cfg::chunk_index(r, c) * Cfg::kVec]),
                       v_ok ? v_src + vl.offset(b, token, hk) + col : v_src, v_ok ? 16 : 0);
    }
  }
  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  if (t4 == 0) {
    for (int i = 0; i < 2; ++i) {
      if (!additional) {
        detail_bwd::neighborhood_key_row_axis(p, smem, group, k_origin, lg, my_row[i]);
        continue;
      }
      int token[kMaxRank];
      const bool valid = key_row(my_row[i], token);
      for (int a = 0; a < kMaxRank; ++a) smem.row_axis[my_row[i]][a] = make_int4(token[a], 0, valid ? 1 : 0, 0);
    }
  }
  // A warp with rows past the grid always masks, so those rows' probabilities are
  // zero (they would otherwise reach d rpb).
  detail_bwd::KeyWarp key_warp{false, false};
  if (additional) {
    key_warp.idle = m0 + 16 * warp >= p.additional_tokens;
    key_warp.partial = m0 + 16 * warp + 16 > p.additional_tokens;
  } else {
    key_warp = detail_bwd::neighborhood_key_warp(p, smem, group, k_origin, lg, warp, lane);
  }

  // ---- column tiles: loads ----------------------------------------------------------
  auto load_cols = [&](const QueryTile& w, int stage) {
    detail_bwd::load_query_tile<Cfg, Cfg::kThreads, kCols * Cfg::kChunks / Cfg::kThreads>(
        p, smem, detail_bwd::col_source<T>(p, w, b, hk), stage, tid);
  };

  // ---- main loop -----------------------------------------------------------------------
  float dk[kDBlocks][4], dv[kDBlocks][4];
  for (int d = 0; d < kDBlocks; ++d)
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;
  const bool has_rpb = p.rpb != nullptr && !additional;
  float* ds32 = reinterpret_cast<float*>(smem_raw + Cfg::kSharedBytes);  // with d rpb only

  // Shared-memory addresses of this lane's ldmatrix rows (swizzle(lane % 8), as in
  // the forward): key rows warp*16 + (lane % 8) + 8 * ((lane / 8) % 2) of K and V as
  // A; query rows 8 * (lane / 16) + lane % 8 of each 16-query pair of Q and dO as B;
  // rows (lane % 8) + 8 * ((lane / 8) % 2) of each 16-row block of Q, dO and K as
  // transposed B; dS^T rows (lane % 8) + 8 * (lane / 16) of each 16-key block, at
  // query chunk 2 * qb + (lane / 8) % 2, as transposed A.
  const int lane_swizzle = detail_bwd::swizzle(kChunks, lane & 7);
  const uint32_t row_a = (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
  const uint32_t k_lane = ptx::smem_address(smem.k) + row_a, v_lane = ptx::smem_address(smem.v) + row_a;
  const uint32_t col_b = ((lane >> 4) * 8 + (lane & 7)) * Cfg::kRowBytes;
  const uint32_t col_bt = ((lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
  const uint32_t q0 = ptx::smem_address(smem.q[0]), dout0 = ptx::smem_address(smem.dout[0]);
  constexpr uint32_t kStageBytes = uint32_t(sizeof(smem.q[0]));

  // acc += X Y over this register pass's queries: X (this warp's 16 keys x the pass's
  // queries, P^T or dS^T) from registers as A, Y the stage's rows of those queries
  // (dO or Q) as B, [query][dim]: dV += P^T dO and dK += dS^T Q.
  auto accumulate_ct = [&](float(&acc)[kDBlocks][4], const float(&x)[kSubBlocks][4], int jb0, uint32_t sub_active,
                           const T* tile, uint32_t tile_address) {
    if constexpr (Cfg::kTf32) {
      // One k-step per n8 block of X, its queries reordered (Mma::a_from_accumulators);
      // Y one float per lane in that order. The pass's k-steps are summed apart and
      // added by FADD (Mma::mma_promoted_if says why), per pass rather than per k-step:
      // per k-step, at head dim 128, ptxas spilled 552 bytes (the temporaries of every
      // column block in flight).
      typename Mma::A a[kSubBlocks];
#pragma unroll
      for (int kb = 0; kb < kSubBlocks; ++kb) a[kb] = Mma::a_from_accumulators(x[kb]);
#pragma unroll
      for (int d = 0; d < kDBlocks; ++d) {
        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kb = 0; kb < kSubBlocks; ++kb) {
          const typename Mma::B b = Mma::make_b_paired(
              lane, [&](int k, int n) { return tile[Cfg::element_index(8 * (jb0 + kb) + k, 8 * d + n)]; });
          Mma::mma_if((sub_active >> kb) & 1u, t, a[kb], b);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[d][e] += t[e];
      }
    } else {
      // The C layout of two n8 blocks is the A layout of k16; Y through ldmatrix.trans.
#pragma unroll
      for (int kb = 0; kb < kSubBlocks / 2; ++kb) {
        const bool on = (sub_active >> (2 * kb)) & 3u;
        uint32_t a[4];
        a[0] = ptx::pack2<T>(x[2 * kb][0], x[2 * kb][1]);
        a[1] = ptx::pack2<T>(x[2 * kb][2], x[2 * kb][3]);
        a[2] = ptx::pack2<T>(x[2 * kb + 1][0], x[2 * kb + 1][1]);
        a[3] = ptx::pack2<T>(x[2 * kb + 1][2], x[2 * kb + 1][3]);
        const uint32_t rows = tile_address + (jb0 / 2 + kb) * 16 * Cfg::kRowBytes + col_bt;
#pragma unroll
        for (int dp = 0; dp < kDBlocks / 2; ++dp) {
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(b, rows + (((2 * dp + (lane >> 4)) ^ lane_swizzle) << 4));
          ptx::mma_16816_if<T>(on, acc[2 * dp], a, b);
          ptx::mma_16816_if<T>(on, acc[2 * dp + 1], a, b + 2);
        }
      }
    }
  };

  __syncthreads();  // the per-CTA tables
  // A key tile no computed query reaches (a query sub-box) walks nothing: dK = dV = 0.
  if (total_tiles > 0) load_cols(query_tile(nb, shape, smem.walk, 0), 0);  // with K and V: group 0
  ptx::cp_async_commit();

  for (int it = 0; it < total_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < total_tiles) {
      load_cols(query_tile(nb, shape, smem.walk, it + 1), stage ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this tile landed (and K, V); the last tile's dS reads are done

    const QueryTile qtile = query_tile(nb, shape, smem.walk, it);
    const int h = hk * p.heads_per_kv + qtile.head;
    int limit[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) limit[a] = qtile.end[a] - qtile.origin[a];
    const detail_bwd::KeyWarpTile wt =
        detail_bwd::key_warp_tile<kColBlocks>(shape, smem, warp, lane, qtile, limit, additional, key_warp, has_rpb);
    const uint32_t active = wt.active;
    if (lane == 0) smem.warp_active[warp] = active;

    const uint32_t q_stage = q0 + stage * kStageBytes, dout_stage = dout0 + stage * kStageBytes;
    const float4* lse_delta4 = reinterpret_cast<const float4*>(smem.lse_delta[stage]);
#pragma unroll 1
    for (int sub = 0; sub < kCols / Cfg::kSubCols; ++sub) {
      const int jb0 = sub * kSubBlocks;  // first n8 block of this pass
      const uint32_t sub_active = (active >> jb0) & ((1u << kSubBlocks) - 1);
      float s[kSubBlocks][4];
      for (int j = 0; j < kSubBlocks; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
      if (sub_active) {
        // S^T = K Q^T. Fragments load for every chunk; a chunk no key of this warp
        // reaches has its mma predicated off. A k-step is two 16-byte chunks.
#pragma unroll(Cfg::kTf32 ? 1 : kChunks / 2)
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          const typename Mma::A a = Mma::load_a(k_lane + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
          const uint32_t col = ((2 * kk + ((lane >> 3) & 1)) ^ lane_swizzle) << 4;
#pragma unroll
          for (int pair = 0; pair < kSubBlocks / 2; ++pair) {
            typename Mma::B b0, b1;
            Mma::load_b_nk(q_stage + (jb0 / 2 + pair) * 16 * Cfg::kRowBytes + col_b + col, b0, b1);
            Mma::mma_promoted_if((sub_active >> (2 * pair)) & 1u, s[2 * pair], a, b0);
            Mma::mma_promoted_if((sub_active >> (2 * pair + 1)) & 1u, s[2 * pair + 1], a, b1);
          }
        }

        // Base-2 scores, masked (-inf) and biased where needed; then P^T.
        detail_bwd::key_scores_to_base2<T>(s, jb0, sub_active, wt.needs_mask, additional, p, smem.row_axis, my_row,
                                           qtile, limit, h, has_rpb, t4);
        detail_bwd::key_probabilities(s, jb0, lse_delta4, t4);

        // dV += P^T dO.
        accumulate_ct(dv, s, jb0, sub_active, smem.dout[stage], dout_stage);

        // dP^T = V dO^T.
        float dp[kSubBlocks][4];
        for (int j = 0; j < kSubBlocks; ++j)
          for (int e = 0; e < 4; ++e) dp[j][e] = 0.f;
#pragma unroll(Cfg::kTf32 ? 1 : kChunks / 2)
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          const typename Mma::A a = Mma::load_a(v_lane + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
          const uint32_t col = ((2 * kk + ((lane >> 3) & 1)) ^ lane_swizzle) << 4;
#pragma unroll
          for (int pair = 0; pair < kSubBlocks / 2; ++pair) {
            typename Mma::B b0, b1;
            Mma::load_b_nk(dout_stage + (jb0 / 2 + pair) * 16 * Cfg::kRowBytes + col_b + col, b0, b1);
            Mma::mma_promoted_if((sub_active >> (2 * pair)) & 1u, dp[2 * pair], a, b0);
            Mma::mma_promoted_if((sub_active >> (2 * pair + 1)) & 1u, dp[2 * pair + 1], a, b1);
          }
        }
        // dS^T = P^T (dP^T - delta); masked entries stay 0.
        detail_bwd::key_score_gradients(s, s, dp, jb0, lse_delta4, t4);

        // dK += dS^T Q.
        accumulate_ct(dk, s, jb0, sub_active, smem.q[stage], q_stage);
      }

      // dS^T to shared memory, zeros for inactive chunks (the dQ product reads all).
#pragma unroll
      for (int j = 0; j < kSubBlocks; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = my_row[i];
          store2<T>(&smem.ds[Cfg::ds_element_index(r, 8 * (jb0 + j) + 2 * t4)], s[j][2 * i], s[j][2 * i + 1]);
          if (rpb_grad)
            *reinterpret_cast<float2*>(&ds32[r * Cfg::kDs32Stride + 8 * (jb0 + j) + 2 * t4]) =
                make_float2(s[j][2 * i], s[j][2 * i + 1]);
        }
    }
    __syncthreads();  // dS^T of every warp in shared memory

    // ---- dQ += dS K for this tile, added to the workspace ---------------------------
    // Warp w takes 16-query block w % kQBlocks and a part of the head dim; the product
    // runs over all keys of the CTA (key block kb = warp kb's rows).
    if (p.dq_accum != nullptr) {
      constexpr int kDParts = Cfg::kWarps / Cfg::kQBlocks, kPairsPerPart = kDBlocks / 2 / kDParts;
      const int qb = warp % Cfg::kQBlocks, part = warp / Cfg::kQBlocks;
      uint32_t cta_active = 0;
      for (int w = 0; w < Cfg::kWarps; ++w) cta_active |= smem.warp_active[w];
      // Bit kb: key block kb (warp kb's rows) reaches this 16-query block. From a
      // ballot, so the predicates below are provably warp-uniform (from shared
      // memory, ptxas fences every mma.sync and ldmatrix with a WARPSYNC).
      const uint32_t kb_on =
          __ballot_sync(0xffffffffu, lane < Cfg::kWarps && ((smem.warp_active[lane] >> (2 * qb)) & 3u));
      if (kb_on) {
        // This thread's two queries (rows g, g + 8 of the block) in the workspace.
        float* dst[2];
        for (int i = 0; i < 2; ++i) {
          const int n = 16 * qb + g + 8 * i;
          const bool ok = ((cta_active >> (2 * qb + i)) & 1u) && detail_bwd::col_valid(smem.col_offset[n], limit);
          dst[i] = ok ? p.dq_accum + (detail_bwd::col_workspace_row(p, smem, qtile, b, n) * p.heads + h) * p.dim
                      : nullptr;
        }
        if constexpr (Cfg::kTf32) {
          // A (queries x keys) from dS^T and B from K ([key][dim]), one float per lane
          // (neither is an ldmatrix layout for 32-bit elements); dim is a multiple of 4,
          // so a lane's pair of columns is inside or outside it together.
#pragma unroll 1
          for (int i = 0; i < kPairsPerPart; ++i) {
            const int dp2 = part * kPairsPerPart + i;
            if (16 * dp2 >= p.dim) break;
            float acc[2][4] = {};
#pragma unroll
            for (int kb = 0; kb < kRows / 8; ++kb) {
              const bool on = (kb_on >> (kb / 2)) & 1u;
              const typename Mma::A a = Mma::make_a(lane, [&](int half, int key) {
                return smem.ds[Cfg::ds_element_index(8 * kb + key, 16 * qb + g + 8 * half)];
              });
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const typename Mma::B bk = Mma::make_b(
                    lane, [&](int key, int n) { return smem.k[Cfg::element_index(8 * kb + key, 16 * dp2 + 8 * half + n)]; });
                Mma::mma_promoted_if(on, acc[half], a, bk);
              }
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int d = 16 * dp2 + 8 * half + 2 * t4;
              if (d >= p.dim) continue;
              if (dst[0]) ptx::red_add2(dst[0] + d, acc[half][0], acc[half][1]);
              if (dst[1]) ptx::red_add2(dst[1] + d, acc[half][2], acc[half][3]);
            }
          }
        } else {
          uint32_t a[kRows / 16][4];
          const uint32_t ds_lane = ptx::smem_address(smem.ds) + ((lane & 7) + ((lane >> 4) << 3)) * Cfg::kDsRowBytes +
                                   (((2 * qb + ((lane >> 3) & 1)) ^ detail_bwd::swizzle(kColBlocks, lane & 7)) << 4);
#pragma unroll
          for (int kb = 0; kb < kRows / 16; ++kb) ptx::ldmatrix_x4_trans(a[kb], ds_lane + kb * 16 * Cfg::kDsRowBytes);
          const uint32_t k_rows = ptx::smem_address(smem.k) + col_bt;
#pragma unroll
          for (int i = 0; i < kPairsPerPart; ++i) {
            const int dp2 = part * kPairsPerPart + i;
            if (16 * dp2 >= p.dim) break;
            float acc[2][4] = {};
#pragma unroll
            for (int kb = 0; kb < kRows / 16; ++kb) {
              const bool on = (kb_on >> kb) & 1u;
              uint32_t bk[4];
              ptx::ldmatrix_x4_trans(bk, k_rows + kb * 16 * Cfg::kRowBytes + (((2 * dp2 + (lane >> 4)) ^ lane_swizzle) << 4));
              ptx::mma_16816_if<T>(on, acc[0], a[kb], bk);
              ptx::mma_16816_if<T>(on, acc[1], a[kb], bk + 2);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int d = 16 * dp2 + 8 * half + 2 * t4;
              if (16 * dp2 + 8 * half >= p.dim) continue;
              if (dst[0]) ptx::red_add2(dst[0] + d, acc[half][0], acc[half][1]);
              if (dst[1]) ptx::red_add2(dst[1] + d, acc[half][2], acc[half][3]);
            }
          }
        }
      }
    }

    // ---- d rpb: bin dS^T by relative position ------------------------------------------
    // Bin (x0, x1, x2) holds the pairs with key offset - query offset = x - (col - 1)
    // per axis; every pair is in exactly one bin, and one thread sums each bin over its
    // queries in a fixed order.
    if (rpb_grad) {
      // Bin x has extent row + col - 1 per axis; its bias index per axis is
      // x - (col - 1) + key tile origin - query tile origin + kernel - 1.
      const int n0 = shape.row(0) + shape.col(0) - 1, n1 = shape.row(1) + shape.col(1) - 1;
      const int n2 = shape.row(2) + shape.col(2) - 1;
      int base[kMaxRank];
      for (int a = 0; a < kMaxRank; ++a)
        base[a] = k_origin[a] - qtile.origin[a] + nb.axis[a].kernel - shape.col(a);
      float* slot = rpb_slot ? rpb_slot + qtile.head * rpb_slot_size : nullptr;
      for (int bin = tid; bin < n0 * n1 * n2; bin += Cfg::kThreads) {
        const int x2 = bin % n2, x1 = bin / n2 % n1, x0 = bin / n2 / n1;
        int index[kMaxRank] = {x0 + base[0], x1 + base[1], x2 + base[2]};
        bool in_span = true;  // else no neighbor pair has this relative position
        for (int a = 0; a < kMaxRank; ++a) in_span &= index[a] >= smem.rpb_lo[a] && index[a] < smem.rpb_hi[a];
        if (!in_span) continue;
        // Queries qo of the tile whose key qo + x - (col - 1) is in the key tile.
        const int c0 = shape.col(0) - 1 - x0, c1 = shape.col(1) - 1 - x1, c2 = shape.col(2) - 1 - x2;
        float sum = 0.f;
        for (int q0 = imax(0, c0); q0 < imin(shape.col(0), shape.row(0) + c0); ++q0)
          for (int q1 = imax(0, c1); q1 < imin(shape.col(1), shape.row(1) + c1); ++q1)
            for (int q2 = imax(0, c2); q2 < imin(shape.col(2), shape.row(2) + c2); ++q2) {
              const int ko[kMaxRank] = {q0 - c0, q1 - c1, q2 - c2};
              const int n = (q0 * shape.col(1) + q1) * shape.col(2) + q2;
              sum += ds32[shape.row_of(ko) * Cfg::kDs32Stride + n];
            }
        if (sum == 0.f) continue;
        if (slot) {
          slot[((index[0] - smem.rpb_lo[0]) * p.rpb_span[1] + index[1] - smem.rpb_lo[1]) * p.rpb_span[2] + index[2] -
               smem.rpb_lo[2]] += sum;
        } else {
          atomicAdd(p.d_rpb + p.drpb_layout.offset(h, index), sum);
        }
      }
    }
  }

  // ---- epilogue: dK = scale * sum dS^T Q and dV, staged through this warp's rows ----
  if (total_tiles == 0) ptx::cp_async_wait<0>();  // K and V, loaded with no query tile
  __syncthreads();  // every warp's last dQ product has read K
  for (int d = 0; d < kDBlocks; ++d)
    for (int i = 0; i < 2; ++i) {
      const int r = my_row[i];
      store2<T>(&smem.k[Cfg::element_index(r, 8 * d + 2 * t4)], dk[d][2 * i] * p.scale, dk[d][2 * i + 1] * p.scale);
      store2<T>(&smem.v[Cfg::element_index(r, 8 * d + 2 * t4)], dv[d][2 * i], dv[d][2 * i + 1]);
    }
  __syncwarp();
  T* dk_out = static_cast<T*>(additional ? p.d_additional_k : p.d_k);
  T* dv_out = static_cast<T*>(additional ? p.d_additional_v : p.d_v);
  const detail::TokenLayout& dkl = additional ? p.dak_layout : p.dk_layout;
  const detail::TokenLayout& dvl = additional ? p.dav_layout : p.dv_layout;
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = warp * 16 + idx / kChunks, c = idx % kChunks;
    int token[kMaxRank];
    if (!key_row(r, token)) continue;
    const int col = c * Cfg::kVec;
    if (dk_out && col < p.dim)
      *reinterpret_cast<uint4*>(dk_out + dkl.offset(b, token, hk) + col) =
          *reinterpret_cast<const uint4*>(&smem.k[Cfg::chunk_index(r, c) * Cfg::kVec]);
    if (dv_out && col < p.dim_v)
      *reinterpret_cast<uint4*>(dv_out + dvl.offset(b, token, hk) + col) =
          *reinterpret_cast<const uint4*>(&smem.v[Cfg::chunk_index(r, c) * Cfg::kVec]);
  }
}

// ---------------------------------------------------------------------------------
// Dq pass (deterministic mode): the forward's orientation, rows queries, columns keys.
template <class T, int kHeadDim_, int kWarps_, int kBlockCols_>
struct DqPassConfig {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockRows = 16 * kWarps;  // queries per CTA
  static constexpr int kBlockCols = kBlockCols_;  // keys per tile
  static constexpr bool kTf32 = sizeof(T) == 4;     // float32: three tf32 products per product
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;
  static constexpr int kColBlocks = kBlockCols / 8;
  static constexpr int kDBlocks = kHeadDim / 8;
  // dQ (kHeadDim / 2 floats per thread) plus S and dP (kBlockCols / 4 each); ptxas
  // -v, sm_90a: 254 registers at head dim 128, 164 at 64, 163 at 32, no spills (4
  // CTAs per SM at 32 would spill 12 bytes).
  static constexpr int kMinBlocksPerSM = kTf32 ? 2 : kHeadDim <= 64 ? 3 : 2;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "dq pass head dim bucket must be 32, 64 or 128");
  static_assert(kBlockCols % 16 == 0 && kBlockCols <= 128, "key tile must be a multiple of 16 keys");

  struct SharedStorage {
    T q[kBlockRows * kHeadDim];  // reused to stage dQ
    T dout[kBlockRows * kHeadDim];
    T k[2][kBlockCols * kHeadDim];
    T v[2][kBlockCols * kHeadDim];
    int64_t k_col_delta[kBlockCols];
    int64_t v_col_delta[kBlockCols];
    int col_offset[kBlockCols];
    int4 row_axis[kBlockRows][kMaxRank];  // {j, window begin, window end, 0}
    int4 warp_box[kWarps][kMaxRank];      // {union begin, union end, intersection begin, end}
  };
  static constexpr int kSharedBytes = int(sizeof(SharedStorage));
  __device__ static constexpr int chunk_index(int r, int c) { return r * kChunks + (c ^ detail_bwd::swizzle(kChunks, r)); }
  __device__ static constexpr int element_index(int r, int col) { return chunk_index(r, col / kVec) * kVec + col % kVec; }
  static constexpr int kRowBytes = kChunks * 16;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_backward_dq_kernel(const __grid_constant__ BackwardParams p) {
  using T = typename Cfg::Element;
  using Mma = nbhd::cuda::Mma<T>;
  using detail_bwd::Box;
  using detail_bwd::kNegInf;
  constexpr int kRows = Cfg::kBlockRows, kCols = Cfg::kBlockCols, kChunks = Cfg::kChunks;
  constexpr int kColBlocks = Cfg::kColBlocks, kDBlocks = Cfg::kDBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const GridTile& shape = p.dq_shape;
  const Neighborhood& nb = p.nb;

  int64_t linear = blockIdx.x;
  const int64_t tile = linear % p.dq_tiles;
  linear /= p.dq_tiles;
  const int h = int(linear % p.heads);
  const int64_t b = linear / p.heads;
  const int hk = h / p.heads_per_kv;

  // Group indices from q_origin, computed up to q_end; windows of the group (lg).
  int group[kMaxRank], lg[kMaxRank], q_origin[kMaxRank], q_end[kMaxRank];
  if (!detail_bwd::decode_query_tile(p, p.dq_tiles_per_group, shape.row_log2, tile, group, q_origin, q_end, lg)) return;

  // Key box: union of the tile's queries' windows; walked in key tiles by an odometer.
  Box kbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const int last = imin(q_origin[a] + shape.row(a), q_end[a]) - 1;
    kbox.r[a] = nb.axis[a].window_union({q_origin[a], last + 1}, lg[a]);
  }
  int neighbor_tiles = 1;
  for (int a = 0; a < kMaxRank; ++a) neighbor_tiles *= ceil_div(kbox.r[a].size(), shape.col(a));
  const int total_tiles = neighbor_tiles + ceil_div(p.additional_tokens, kCols);
  struct Odometer {
    int origin[kMaxRank];
    __device__ void advance(const Box& box, const GridTile& shape) {
      for (int a = kMaxRank - 1; a >= 0; --a) {
        origin[a] += shape.col(a);
        if (origin[a] < box.r[a].end || a == 0) return;
        origin[a] = box.r[a].begin;
      }
    }
  };

  // ---- this CTA's queries: Q and dO rows, lse and delta, windows -------------------
  auto query_row = [&](int r, int* j, int* token) {
    int off[kMaxRank];
    shape.row_offset(r, off);
    bool valid = true;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = q_origin[a] + off[a];
      valid &= j[a] < q_end[a];
    }
    detail_bwd::token_of(nb, group, j, token);
    return valid;
  };
  for (int idx = tid; idx < kRows * kChunks; idx += Cfg::kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    int j[kMaxRank], token[kMaxRank];
    const bool valid = query_row(r, j, token);
    const int col = c * Cfg::kVec;
    const bool q_ok = valid && col < p.dim, d_ok = valid && col < p.dim_v;
    const T* q_src = static_cast<const T*>(p.q);
    const T* d_src = static_cast<const T*>(p.d_out);
    ptx::cp_async_16(ptx::smem_address(&smem.q[Cfg::chunk_index(r, c) * Cfg::kVec]),
                     q_ok ? q_src + p.q_layout.offset(b, token, h) + col : q_src, q_ok ? 16 : 0);
    ptx::cp_async_16(ptx::smem_address(&smem.dout[Cfg::chunk_index(r, c) * Cfg::kVec]),
                     d_ok ? d_src + p.dout_layout.offset(b, token, h) + col : d_src, d_ok ? 16 : 0);
  }
  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  // lse and delta of this thread's rows (rows past the grid: zeros, harmless).
  float row_lse[2], row_delta[2];
  for (int i = 0; i < 2; ++i) {
    int j[kMaxRank], token[kMaxRank];
    const bool valid = query_row(my_row[i], j, token);
    const float2 ld = valid ? reinterpret_cast<const float2*>(p.lse_delta)[(b * p.heads + h) * p.tokens +
                                                                           detail_bwd::flat_token(p, token)]
                            : make_float2(0.f, 0.f);
    row_lse[i] = ld.x;
    row_delta[i] = ld.y;
    if (t4 == 0)
      for (int a = 0; a < kMaxRank; ++a) {
        const Range w = valid ? nb.axis[a].window(j[a], lg[a]) : Range{0, 0};
        smem.row_axis[my_row[i]][a] = make_int4(j[a], w.begin, w.end, 0);
      }
  }
  bool warp_idle = false;
  {
    int off[kMaxRank];
    shape.warp_offset(warp, off);
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = nb.axis[a];
      const int first = q_origin[a] + off[a];
      const int last = imin(first + shape.warp(a), q_end[a]) - 1;
      warp_idle |= first > last;
      const Range wf = ax.window(imin(first, lg[a] - 1), lg[a]), wl = ax.window(imax(last, 0), lg[a]);
      if (lane == 0) smem.warp_box[warp][a] = make_int4(wf.begin, wl.end, wl.begin, wf.end);
    }
  }

  // ---- key tiles ----------------------------------------------------------------------
  constexpr int kRowStep = Cfg::kThreads / kChunks;
  static_assert(Cfg::kThreads % kChunks == 0 && kCols % kRowStep == 0, "load mapping");
  const int chunk = tid % kChunks, load_row = tid / kChunks;
  for (int n = tid; n < kCols; n += Cfg::kThreads) {
    int off[kMaxRank];
    shape.col_offset(n, off);
    int64_t dk = 0, dv = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      dk += int64_t(off[a]) * nb.axis[a].dilation * p.k_layout.axis[a];
      dv += int64_t(off[a]) * nb.axis[a].dilation * p.v_layout.axis[a];
    }
    smem.k_col_delta[n] = dk;
    smem.v_col_delta[n] = dv;
    smem.col_offset[n] = off[0] | (off[1] << 10) | (off[2] << 20);
  }
  __syncthreads();  // the tables
  Odometer load_tile{{kbox.r[0].begin, kbox.r[1].begin, kbox.r[2].begin}};
  Odometer compute_tile = load_tile;
  const int chunk_col = chunk * Cfg::kVec;  // this thread's first column
  const bool k_chunk_ok = chunk_col < p.dim, v_chunk_ok = chunk_col < p.dim_v;
  struct TileSource {
    const T* k;
    const T* v;
    int limit[kMaxRank];
    int first_additional;  // -1 for a neighborhood tile
    bool wraps;            // a periodic axis's key tile past its group's end: rows by token
    int origin[kMaxRank];
  };
  const int col_extent[kMaxRank] = {shape.col(0), shape.col(1), shape.col(2)};
  auto tile_source = [&](int it) {
    TileSource src;
    src.wraps = false;
    if (it < neighbor_tiles) {
      int token[kMaxRank] = {0, 0, 0};
      src.wraps = detail_bwd::tile_wraps(nb, group, load_tile.origin, col_extent);
      if (!src.wraps) detail_bwd::token_of(nb, group, load_tile.origin, token);
      for (int a = 0; a < kMaxRank; ++a) {
        src.limit[a] = kbox.r[a].end - load_tile.origin[a];
        src.origin[a] = load_tile.origin[a];
      }
      src.k = static_cast<const T*>(p.k) + p.k_layout.offset(b, token, hk);
      src.v = static_cast<const T*>(p.v) + p.v_layout.offset(b, token, hk);
      src.first_additional = -1;
      load_tile.advance(kbox, shape);
    } else {
      const int m0 = (it - neighbor_tiles) * kCols;
      const int first[kMaxRank] = {0, 0, m0};
      src.k = static_cast<const T*>(p.additional_k) + p.ak_layout.offset(b, first, hk);
      src.v = static_cast<const T*>(p.additional_v) + p.av_layout.offset(b, first, hk);
      src.first_additional = m0;
    }
    return src;
  };
  auto load_cols = [&](const TileSource& src, int stage) {
#pragma unroll
    for (int i = 0; i < kCols / kRowStep; ++i) {
      const int n = load_row + i * kRowStep;
      bool valid;
      int64_t dk, dv;
      if (src.first_additional < 0) {
        const int packed = smem.col_offset[n];
        valid = (packed & 1023) < src.limit[0] && ((packed >> 10) & 1023) < src.limit[1] &&
                (packed >> 20) < src.limit[2];
        dk = smem.k_col_delta[n];
        dv = smem.v_col_delta[n];
        if (src.wraps) {  // offsets from the bases of (b, token 0, hk)
          int token[kMaxRank];
          const int zero[kMaxRank] = {0, 0, 0};
          detail_bwd::packed_token(nb, group, src.origin, packed, token);
          dk = p.k_layout.offset(0, token, 0) - p.k_layout.offset(0, zero, 0);
          dv = p.v_layout.offset(0, token, 0) - p.v_layout.offset(0, zero, 0);
        }
      } else {
        valid = src.first_additional + n < p.additional_tokens;
        dk = n * p.ak_layout.axis[2];
        dv = n * p.av_layout.axis[2];
      }
      const bool k_ok = valid && k_chunk_ok, v_ok = valid && v_chunk_ok;
      ptx::cp_async_16(ptx::smem_address(&smem.k[stage][Cfg::chunk_index(n, chunk) * Cfg::kVec]),
                       src.k + (k_ok ? dk + chunk_col : 0), k_ok ? 16 : 0);
      ptx::cp_async_16(ptx::smem_address(&smem.v[stage][Cfg::chunk_index(n, chunk) * Cfg::kVec]),
                       src.v + (v_ok ? dv + chunk_col : 0), v_ok ? 16 : 0);
    }
  };

  float dq[kDBlocks][4];
  for (int d = 0; d < kDBlocks; ++d)
    for (int e = 0; e < 4; ++e) dq[d][e] = 0.f;
  const bool has_rpb = p.rpb != nullptr;

  // ldmatrix lane addresses (see the forward): Q and dO rows as A; K and V rows of
  // each 16-key pair as B; K rows of each 16-key block as transposed B.
  const int lane_swizzle = detail_bwd::swizzle(kChunks, lane & 7);
  const uint32_t row_a = (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
  const uint32_t q_lane = ptx::smem_address(smem.q) + row_a, dout_lane = ptx::smem_address(smem.dout) + row_a;
  const uint32_t col_b = ((lane >> 4) * 8 + (lane & 7)) * Cfg::kRowBytes;
  const uint32_t col_bt = ((lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
  const uint32_t k0 = ptx::smem_address(smem.k[0]), v0 = ptx::smem_address(smem.v[0]);
  constexpr uint32_t kStageBytes = uint32_t(sizeof(smem.k[0]));

  {
    const TileSource first = tile_source(0);  // with Q and dO: group 0
    load_cols(first, 0);
    ptx::cp_async_commit();
  }
  for (int it = 0; it < total_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < total_tiles) {
      const TileSource next = tile_source(it + 1);
      load_cols(next, stage ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this tile (and Q, dO) landed

    const bool additional = it >= neighbor_tiles;
    int origin[kMaxRank] = {0, 0, 0};
    uint32_t active = 0;
    bool needs_mask = true;
    if (!warp_idle) {
      if (!additional) {
        for (int a = 0; a < kMaxRank; ++a) origin[a] = compute_tile.origin[a];
        bool lane_active = false;
        if (lane < kColBlocks) {
          int off[kMaxRank];
          shape.col_offset(lane * 8, off);
          lane_active = true;
          for (int a = 0; a < kMaxRank; ++a) {
            const int4 box = smem.warp_box[warp][a];
            const int lo = origin[a] + off[a], hi = lo + (a == kMaxRank - 1 ? 8 : 1);
            lane_active &= lo < box.y && hi > box.x && lo < kbox.r[a].end;
          }
        }
        active = __ballot_sync(0xffffffffu, lane_active);
        needs_mask = has_rpb;
        for (int a = 0; a < kMaxRank; ++a) {
          const int4 box = smem.warp_box[warp][a];
          const int lo = origin[a], hi = origin[a] + shape.col(a);
          needs_mask |= lo < box.z || hi > box.w || hi > kbox.r[a].end;
        }
      } else {
        const int m0 = (it - neighbor_tiles) * kCols;
        active = __ballot_sync(0xffffffffu, lane < kColBlocks && m0 + lane * 8 < p.additional_tokens);
        needs_mask = m0 + kCols > p.additional_tokens;
      }
    }

    if (active) {
      const uint32_t k_stage = k0 + stage * kStageBytes, v_stage = v0 + stage * kStageBytes;
      // S = Q K^T.
      float s[kColBlocks][4];
      for (int j = 0; j < kColBlocks; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll(Cfg::kTf32 ? 1 : kChunks / 2)
      for (int kk = 0; kk < kChunks / 2; ++kk) {
        const typename Mma::A a = Mma::load_a(q_lane + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
        const uint32_t col = ((2 * kk + ((lane >> 3) & 1)) ^ lane_swizzle) << 4;
#pragma unroll
        for (int pair = 0; pair < kColBlocks / 2; ++pair) {
          typename Mma::B b0, b1;
          Mma::load_b_nk(k_stage + pair * 16 * Cfg::kRowBytes + col_b + col, b0, b1);
          Mma::mma_promoted_if((active >> (2 * pair)) & 1u, s[2 * pair], a, b0);
          Mma::mma_promoted_if((active >> (2 * pair + 1)) & 1u, s[2 * pair + 1], a, b1);
        }
      }
      if (!needs_mask) {
#pragma unroll
        for (int j = 0; j < kColBlocks; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] *= p.scale_log2;
      } else if (additional) {
        const int valid_keys = p.additional_tokens - (it - neighbor_tiles) * kCols;
#pragma unroll
        for (int j = 0; j < kColBlocks; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = 8 * j + 2 * t4 + (e & 1);
            s[j][e] = n < valid_keys ? s[j][e] * p.scale_log2 : kNegInf;
          }
      } else {
        int lo[2][kMaxRank], hi[2][kMaxRank];
        int64_t bias_base[2];
        for (int i = 0; i < 2; ++i) {
          bias_base[i] = int64_t(h) * p.rpb_layout.head;
          for (int a = 0; a < kMaxRank; ++a) {
            const int4 ra = smem.row_axis[my_row[i]][a];  // {j, window begin, window end}
            lo[i][a] = ra.y - origin[a];
            hi[i][a] = imin(ra.z, kbox.r[a].end) - origin[a];
            bias_base[i] += int64_t(origin[a] - ra.x + nb.axis[a].kernel - 1) * p.rpb_layout.axis[a];
          }
        }
#pragma unroll
        for (int j = 0; j < kColBlocks; ++j) {
          const bool chunk_on = (active >> j) & 1u;
          int off[kMaxRank];
          shape.col_offset(8 * j, off);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, off2 = off[2] + 2 * t4 + (e & 1);
            const bool keep = chunk_on && off[0] >= lo[i][0] && off[0] < hi[i][0] && off[1] >= lo[i][1] &&
                              off[1] < hi[i][1] && off2 >= lo[i][2] && off2 < hi[i][2];
            float x = kNegInf;
            if (keep) {
              x = s[j][e] * p.scale_log2;
              if (has_rpb) {
                const int64_t ro = bias_base[i] + off[0] * p.rpb_layout.axis[0] + off[1] * p.rpb_layout.axis[1] +
                                   off2 * p.rpb_layout.axis[2];
                const float bias = p.rpb_is_float32 ? __ldg(static_cast<const float*>(p.rpb) + ro)
                                                    : to_float(static_cast<const T*>(p.rpb)[ro]);
                x += bias * kLog2e;
              }
            }
            s[j][e] = x;
          }
        }
      }
      // P = exp2(score - lse): rows hold queries, lse varies along e >> 1.
#pragma unroll
      for (int j = 0; j < kColBlocks; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = ptx::exp2_approx(s[j][e] - row_lse[e >> 1]);

      // dP = dO V^T.
      float dp[kColBlocks][4];
      for (int j = 0; j < kColBlocks; ++j)
        for (int e = 0; e < 4; ++e) dp[j][e] = 0.f;
#pragma unroll(Cfg::kTf32 ? 1 : kChunks / 2)
      for (int kk = 0; kk < kChunks / 2; ++kk) {
        const typename Mma::A a = Mma::load_a(dout_lane + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
        const uint32_t col = ((2 * kk + ((lane >> 3) & 1)) ^ lane_swizzle) << 4;
#pragma unroll
        for (int pair = 0; pair < kColBlocks / 2; ++pair) {
          typename Mma::B b0, b1;
          Mma::load_b_nk(v_stage + pair * 16 * Cfg::kRowBytes + col_b + col, b0, b1);
          Mma::mma_promoted_if((active >> (2 * pair)) & 1u, dp[2 * pair], a, b0);
          Mma::mma_promoted_if((active >> (2 * pair + 1)) & 1u, dp[2 * pair + 1], a, b1);
        }
      }
      // dS = P (dP - delta).
#pragma unroll
      for (int j = 0; j < kColBlocks; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - row_delta[e >> 1];

      // dQ += dS K, dS from registers.
      if constexpr (Cfg::kTf32) {
        // One k-step per n8 block of dS, its keys reordered (Mma::a_from_accumulators);
        // K one float per lane in that order.
        const T* k_tile = smem.k[stage];
#pragma unroll
        for (int kb = 0; kb < kColBlocks; ++kb) {
          const bool on = (active >> kb) & 1u;
          const typename Mma::A a = Mma::a_from_accumulators(s[kb]);
#pragma unroll
          for (int d = 0; d < kDBlocks; ++d) {
            const typename Mma::B bk =
                Mma::make_b_paired(lane, [&](int k, int n) { return k_tile[Cfg::element_index(8 * kb + k, 8 * d + n)]; });
            Mma::mma_promoted_if(on, dq[d], a, bk);
          }
        }
      } else {
#pragma unroll
      for (int kb = 0; kb < kCols / 16; ++kb) {
        const bool on = (active >> (2 * kb)) & 3u;
        uint32_t a[4];
        a[0] = ptx::pack2<T>(s[2 * kb][0], s[2 * kb][1]);
        a[1] = ptx::pack2<T>(s[2 * kb][2], s[2 * kb][3]);
        a[2] = ptx::pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
        a[3] = ptx::pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
        const uint32_t rows = k_stage + kb * 16 * Cfg::kRowBytes + col_bt;
#pragma unroll
        for (int dp2 = 0; dp2 < kDBlocks / 2; ++dp2) {
          uint32_t bk[4];
          ptx::ldmatrix_x4_trans(bk, rows + (((2 * dp2 + (lane >> 4)) ^ lane_swizzle) << 4));
          ptx::mma_16816_if<T>(on, dq[2 * dp2], a, bk);
          ptx::mma_16816_if<T>(on, dq[2 * dp2 + 1], a, bk + 2);
        }
      }
      }
    }
    if (!additional) compute_tile.advance(kbox, shape);
    __syncthreads();  // the next iteration's loads overwrite this stage
  }

  // ---- epilogue: dQ = scale * sum dS K, staged through this warp's rows of smem.q ----
  for (int d = 0; d < kDBlocks; ++d)
    for (int i = 0; i < 2; ++i)
      store2<T>(&smem.q[Cfg::element_index(my_row[i], 8 * d + 2 * t4)], dq[d][2 * i] * p.scale,
                dq[d][2 * i + 1] * p.scale);
  __syncwarp();
  T* out = static_cast<T*>(p.d_q);
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = warp * 16 + idx / kChunks, c = idx % kChunks;
    int j[kMaxRank], token[kMaxRank];
    if (!query_row(r, j, token) || c * Cfg::kVec >= p.dim) continue;
    *reinterpret_cast<uint4*>(out + p.dq_layout.offset(b, token, h) + c * Cfg::kVec) =
        *reinterpret_cast<const uint4*>(&smem.q[Cfg::chunk_index(r, c) * Cfg::kVec]);
  }
}

// ---------------------------------------------------------------------------------
// Small passes.

// lse_delta = {lse * log2(e), rowsum(dO * out)}: 4 threads per (batch, token, head)
// row, each summing 16-byte chunks c, c + 4, ... (dim_v is a multiple of 16 bytes).
template <class T>
__global__ void fused_backward_preprocess_kernel(const __grid_constant__ BackwardParams p) {
  const int64_t rows = int64_t(p.batch) * p.tokens * p.heads;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 2;
  const int part = threadIdx.x & 3;
  const bool valid = row < rows;
  const int h = int(row % p.heads);
  const int64_t flat = row / p.heads % p.tokens, b = row / p.heads / p.tokens;
  int token[kMaxRank];
  detail_bwd::token_of_flat(p, flat, token);
  float sum = 0.f;
  if (valid) {
    const T* o = static_cast<const T*>(p.out) + p.out_layout.offset(b, token, h);
    const T* d = static_cast<const T*>(p.d_out) + p.dout_layout.offset(b, token, h);
    constexpr int kVec = 16 / int(sizeof(T));
    for (int c = part; c * kVec < p.dim_v; c += 4) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c * kVec), dv = *reinterpret_cast<const uint4*>(d + c * kVec);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum += to_float(oe[e]) * to_float(de[e]);
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (valid && part == 0) {
    if (p.d_lse) sum -= p.d_lse[p.d_lse_layout.offset(b, token, h)];
    reinterpret_cast<float2*>(p.lse_delta)[(b * p.heads + h) * p.tokens + flat] =
        make_float2(p.lse[p.lse_layout.offset(b, token, h)] * kLog2e, sum);
  }
}

// d_query = scale * dq_accum, one 16-byte chunk of d_query (8 or 4 elements) per thread.
template <class T>
__global__ void fused_backward_convert_dq_kernel(const __grid_constant__ BackwardParams p) {
  constexpr int kVec = 16 / int(sizeof(T));
  const int chunks = p.dim / kVec;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.batch) * p.tokens * p.heads * chunks) return;
  const int c = int(idx % chunks);
  const int64_t row = idx / chunks;  // (b * tokens + flat) * heads + h
  const int h = int(row % p.heads);
  const int64_t flat = row / p.heads % p.tokens, b = row / p.heads / p.tokens;
  int token[kMaxRank];
  detail_bwd::token_of_flat(p, flat, token);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + row * p.dim + c * kVec);
  T* dst = static_cast<T*>(p.d_q) + p.dq_layout.offset(b, token, h) + c * kVec;
  if constexpr (kVec == 4) {
    const float4 x = src[0];
    *reinterpret_cast<float4*>(dst) = make_float4(x.x * p.scale, x.y * p.scale, x.z * p.scale, x.w * p.scale);
  } else {
    const float4 x = src[0], y = src[1];
    uint4 v;
    v.x = ptx::pack2<T>(x.x * p.scale, x.y * p.scale);
    v.y = ptx::pack2<T>(x.z * p.scale, x.w * p.scale);
    v.z = ptx::pack2<T>(y.x * p.scale, y.y * p.scale);
    v.w = ptx::pack2<T>(y.z * p.scale, y.w * p.scale);
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

// Bias index i (row-major over [H, 2k-1, ...]) as head and per-axis indices.
__device__ __forceinline__ int decode_rpb_index(const Neighborhood& nb, int64_t i, int* idx) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const int n = 2 * nb.axis[a].kernel - 1;
    idx[a] = int(i % n);
    i /= n;
  }
  return int(i);
}

// d_rpb = 0 before the key pass's atomics. (Templates, like every kernel here: each
// generated translation unit instantiates them, and non-template definitions in
// this header would collide at link time. Neither d rpb kernel reads an element of
// the dtype, so each is one instantiation for every translation unit.)
template <int = 0>
__global__ void fused_backward_zero_rpb_kernel(const __grid_constant__ BackwardParams p, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  int idx[kMaxRank];
  const int h = decode_rpb_index(p.nb, i, idx);
  p.d_rpb[p.drpb_layout.offset(h, idx)] = 0.f;
}

// Deterministic d rpb: d_rpb[h, idx] = sum, in a fixed order (batch, then key tiles
// in grid order), of the key-pass CTAs' partial sums whose span holds idx.
template <int = 0>
__global__ void fused_backward_reduce_rpb_kernel(const __grid_constant__ BackwardParams p, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const Neighborhood& nb = p.nb;
  int idx[kMaxRank];
  const int h = decode_rpb_index(nb, i, idx);
  const int hk = h / p.heads_per_kv, hg = h % p.heads_per_kv;
  const int slot_size = p.rpb_span[0] * p.rpb_span[1] * p.rpb_span[2];
  // Per axis, tile coordinate ta = group * tiles_per_group + t (the key pass's decode).
  int per_axis[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) per_axis[a] = p.kv_tiles_per_group[a] * nb.axis[a].dilation;
  // lo of axis a for tile coordinate ta, or -1 when the tile is empty or misses idx.
  auto axis_lo = [&](int a, int ta) {
    const Axis& ax = nb.axis[a];
    const int group = ta / p.kv_tiles_per_group[a];
    const int origin = (ta % p.kv_tiles_per_group[a]) << p.kv_shape.row_log2[a];
    const int lg = ax.group_length(group);
    if (origin >= lg) return -1;
    const Range span = key_tile_rpb_span(ax, lg, origin, p.kv_shape.row(a));
    return span.contains(idx[a]) ? span.begin : -1;
  };
  float sum = 0.f;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int t0 = 0; t0 < per_axis[0]; ++t0) {
      const int lo0 = axis_lo(0, t0);
      if (lo0 < 0) continue;
      for (int t1 = 0; t1 < per_axis[1]; ++t1) {
        const int lo1 = axis_lo(1, t1);
        if (lo1 < 0) continue;
        for (int t2 = 0; t2 < per_axis[2]; ++t2) {
          const int lo2 = axis_lo(2, t2);
          if (lo2 < 0) continue;
          const int64_t tile = (int64_t(t0) * per_axis[1] + t1) * per_axis[2] + t2;
          const int64_t cta = (b * p.kv_heads + hk) * p.kv_tiles + tile;
          sum += p.rpb_partial[(cta * p.heads_per_kv + hg) * slot_size +
                               ((idx[0] - lo0) * p.rpb_span[1] + idx[1] - lo1) * p.rpb_span[2] + idx[2] - lo2];
        }
      }
    }
  p.d_rpb[p.drpb_layout.offset(h, idx)] = sum;
}

// ---------------------------------------------------------------------------------
// The compiled configurations per (dtype, head dim), and the launch sequence.
template <class T, int kHeadDim>
struct BackwardKernels {
  // Column tiles: backward_cols() (backward_plan.hpp) says why.
  static constexpr int kCols = sizeof(T) == 4 && kHeadDim == 128 ? 32 : 64;
  // Key pass: 64 keys (4 warps) x column tiles in 32-query register passes (a
  // 64-query pass needs 248 registers at head dim 64 and spills at 128); float32 at
  // head dim 128 in 16-query passes (32 spilled 884 bytes: the split fragments).
  static constexpr int kSubCols = sizeof(T) == 4 && kHeadDim == 128 ? 16 : 32;
  using KeyPass = KeyPassConfig<T, kHeadDim, 4, kCols, kSubCols>;
  using DqPass = DqPassConfig<T, kHeadDim, 4, kCols>;
};

// Launches the passes for a problem whose params (and workspace) are filled in.
template <class T, int kHeadDim>
cudaError_t launch_fused_backward(const BackwardParams& p, cudaStream_t stream) {
  using Kernels = BackwardKernels<T, kHeadDim>;
  using KeyPass = typename Kernels::KeyPass;
  using DqPass = typename Kernels::DqPass;
  constexpr int kThreads = 256;
  auto blocks_for = [](int64_t n, int per_block) { return (n + per_block - 1) / per_block; };

  // Every grid, checked before the first launch: a refusal after the preprocess ran
  // would leave later passes' outputs half written.
  const int64_t rpb_count = p.d_rpb ? int64_t(p.heads) * (2 * p.nb.axis[0].kernel - 1) *
                                          (2 * p.nb.axis[1].kernel - 1) * (2 * p.nb.axis[2].kernel - 1)
                                    : 0;
  const int64_t rpb_blocks = blocks_for(rpb_count, kThreads);
  const int64_t pre_blocks = blocks_for(int64_t(p.batch) * p.tokens * p.heads * 4, kThreads);
  // Key pass: the mma.sync kernel for every CTA, or the wgmma kernel for the
  // neighborhood key tiles and the mma.sync one for the additional tokens' CTAs
  // (first in its grid: a grid of only those runs only those).
  const int64_t key_blocks =
      int64_t(p.batch) * p.kv_heads * ((p.wgmma_key_pass || p.kv_halo_rows > 0 ? 0 : p.kv_tiles) + p.additional_ctas);
  const int64_t wgmma_blocks = p.wgmma_key_pass ? int64_t(p.batch) * p.kv_heads * p.kv_tiles : 0;
  const int64_t dq_blocks = p.dq_accum ? blocks_for(int64_t(p.batch) * p.tokens * p.heads * (p.dim / (16 / int(sizeof(T)))), kThreads)
                                       : p.dq_tiles * p.heads * p.batch;
  const int64_t halo_key_blocks = p.kv_halo_rows > 0 ? int64_t(p.batch) * p.kv_heads * p.kv_tiles : 0;
  for (const int64_t blocks : {rpb_blocks, pre_blocks, key_blocks, wgmma_blocks, halo_key_blocks, dq_blocks})
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (p.wgmma_key_pass && !kHasWgmmaKeyPass<T, kHeadDim>) return cudaErrorInvalidValue;  // offered only where compiled

  // Each launch is checked before the next: a failed one must not be followed by
  // kernels that read what it should have written.
  if (p.dq_accum) {
    const cudaError_t err =
        cudaMemsetAsync(p.dq_accum, 0, size_t(p.batch) * p.tokens * p.heads * p.dim * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  if (p.d_rpb && !p.rpb_partial) {
    fused_backward_zero_rpb_kernel<><<<unsigned(rpb_blocks), kThreads, 0, stream>>>(p, rpb_count);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  fused_backward_preprocess_kernel<T><<<unsigned(pre_blocks), kThreads, 0, stream>>>(p);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  if constexpr (kHasWgmmaKeyPass<T, kHeadDim>) {
    if (p.wgmma_key_pass)
      if (const cudaError_t e = launch_fused_backward_key_wgmma<T, kHeadDim>(p, stream); e != cudaSuccess) return e;
  }
  if (p.kv_halo_rows > 0) {
    if constexpr (sizeof(T) == 2 && kHeadDim <= 64) {
      if (const cudaError_t e = launch_fused_backward_key_halo<T, kHeadDim>(p, stream); e != cudaSuccess) return e;
    } else {
      return cudaErrorInvalidValue;  // planned only where compiled (halo_key_entry)
    }
  }
  if (key_blocks > 0) {
    // The opt-in covers the d rpb buffer; a launch uses what it needs.
    if (const cudaError_t e = allow_shared_memory<fused_backward_key_kernel<KeyPass>>(KeyPass::kSharedBytes + KeyPass::kRpbBytes);
        e != cudaSuccess)
      return e;
    const int bytes = KeyPass::kSharedBytes + (p.d_rpb ? KeyPass::kRpbBytes : 0);
    fused_backward_key_kernel<KeyPass><<<dim3(unsigned(key_blocks)), dim3(KeyPass::kThreads), bytes, stream>>>(p);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }

  if (p.dq_accum) {
    fused_backward_convert_dq_kernel<T><<<unsigned(dq_blocks), kThreads, 0, stream>>>(p);
  } else if (p.dq_halo_rows > 0) {
    if constexpr (sizeof(T) == 2 && kHeadDim <= 64) {
      if (const cudaError_t e = launch_fused_backward_dq_halo<T, kHeadDim>(p, stream); e != cudaSuccess) return e;
    } else {
      return cudaErrorInvalidValue;  // planned only where compiled (halo_dq_entry)
    }
  } else {
    if (const cudaError_t e = allow_shared_memory<fused_backward_dq_kernel<DqPass>>(DqPass::kSharedBytes); e != cudaSuccess)
      return e;
    fused_backward_dq_kernel<DqPass><<<dim3(unsigned(dq_blocks)), dim3(DqPass::kThreads), DqPass::kSharedBytes, stream>>>(p);
  }
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (p.d_rpb && p.rpb_partial)
    fused_backward_reduce_rpb_kernel<><<<unsigned(rpb_blocks), kThreads, 0, stream>>>(p, rpb_count);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
