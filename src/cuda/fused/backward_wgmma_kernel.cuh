// SPDX-License-Identifier: Apache-2.0
// The fused backward's key pass on Hopper (sm_90a, fp16 / bf16, head dims 64 and
// 128): FlashAttention-3's backward structure over a neighborhood CTA's query walk.
//
// One CTA holds 128 keys (a box of one dilation group: the table's 8-warp query
// tile) for one kv head: two consumer warpgroups of 64 keys each and a producer
// warpgroup that loads K and V once, then the walk's 64-query tiles (Q, dO, lse and
// delta) into a ring of kStages stages, synchronised by mbarriers (pipeline.cuh):
// Q and dO by TMA where the tensors allow (one thread, a box of the token grid per
// 64-column slab; BackwardParams::key_pass_tma), else by cp.async, and lse and
// delta by cp.async. Per tile and consumer warpgroup, all five products are wgmma:
//   S^T = K Q^T, dP^T = V dO^T          (shared-memory operands, m64n64)
//   P^T, dS^T as the mma.sync key pass forms them (backward_parts.cuh)
//   dV += P^T dO, dK += dS^T Q          (P^T, dS^T from registers, m64 x head dim)
//   dQ = dS K                           (this warpgroup's keys: its dS^T through
//                                        shared memory, m64 x head dim)
// and each warpgroup's dQ is staged in shared memory and added to the float32
// workspace by bulk reduce-add, a row per lane, without waiting for it. The two
// consumer warpgroups never wait for each other. A warpgroup whose keys reach none
// of a tile's queries skips it. d rpb: each warpgroup bins its dS^T by relative
// position in shared memory (atomics, so in no fixed order: the deterministic mode
// takes the mma.sync key pass for it) and adds the tile's bins to d_rpb, one atomic
// per bin. Additional tokens run on the mma.sync key pass (their CTAs are launched
// beside this one).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/mma.cuh"
#include "cuda/common/pipeline.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/shared_memory.hpp"
#include "cuda/common/tma.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fused/backward_params.hpp"
#include "cuda/fused/backward_parts.cuh"
#include "cuda/fused/backward_ptx.cuh"

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_>
struct WgmmaKeyPassConfig {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  // rpb (its bias in the recomputed scores) and d rpb, at head dim 64 only: there
  // ptxas spills no more with their paths (220 / 320 bytes of spill stores / loads,
  // against 224 / 324 without), while at head dim 128 the bias path took every
  // problem's kernel from 264 to 508 bytes of spill stores. Head dim 128 with an rpb
  // or d rpb runs the mma.sync key pass (wgmma_key_pass_refusal).
  static constexpr bool kRpb = kHeadDim == 64;
  static constexpr int kConsumerWarps = 8;    // two warpgroups of 64 keys
  static constexpr int kConsumerThreads = 32 * kConsumerWarps;
  static constexpr int kThreads = kConsumerThreads + 128;  // and the producer warpgroup
  static constexpr int kBlockRows = 16 * kConsumerWarps;   // keys per CTA
  static constexpr int kBlockCols = 64;  // queries per tile: N of S^T and dP^T, k of dV and dK
  static constexpr int kVec = 8;         // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;
  static constexpr int kColBlocks = kBlockCols / 8;  // 8-query chunks of a tile
  // float32 dQ staging rows: padded by 8 floats, so that the 64-bit stores of a
  // half warp (rows g, columns 2t) hit 32 different banks.
  static constexpr int kDqStride = kHeadDim + 8;
  // Query-tile stages: shared memory at 1 CTA per SM (head dim 128: K and V 64 KB,
  // dS^T 16 KB, dQ staging 68 KB, 33 KB per stage; 64: 32 + 16 + 36 + 16.5 per stage).
  static constexpr int kStages = kHeadDim == 128 ? 2 : 4;
  // setmaxnreg moves registers within the CTA's launch allocation (384 x 168: the
  // 64 K file at 1 CTA per SM, in steps of 8): producer + 2 x consumer <= 504.
  // (A claim past it waits forever: 32 + 2 x 240 hung on an H100.) The consumers
  // hold dK and dV (kHeadDim floats) and S^T and dP^T of 64 queries (32 each). Head
  // dim 128: 24 / 240 (ptxas: consumers spill 140 bytes at 224, 16 at 232, none at
  // 240; the producer's 24 spill 264 / 444 bytes, and 40 / 232 moves spills into the
  // consumers' loop). Head dim 64: 56 / 224, where nothing spills (at 24 / 240 the
  // producer spilled 220 / 320 bytes: 113 local loads and stores against 10).
  static constexpr int kProducerRegisters = kHeadDim == 64 ? 56 : 24;
  static constexpr int kConsumerRegisters = kHeadDim == 64 ? 224 : 240;
  static_assert(kProducerRegisters + 2 * kConsumerRegisters <= 504, "setmaxnreg past the launch allocation");
  static constexpr int kRpbBins = RpbBins::kCapacity;  // d rpb bins per warpgroup
  static_assert(sizeof(T) == 2 && (kHeadDim == 64 || kHeadDim == 128), "wgmma key pass: 16-bit, head dim 64 or 128");

  struct SharedStorage {
    // wgmma operands, 128-byte-swizzled in slabs of 64 columns (wgmma.cuh); every
    // array a multiple of 1 KB, so each starts on a 1024-byte boundary.
    T k[kBlockRows * kHeadDim];  // reused to stage dK at the end
    T v[kBlockRows * kHeadDim];  // reused to stage dV
    T q[kStages][kBlockCols * kHeadDim];
    T dout[kStages][kBlockCols * kHeadDim];
    // dS^T [key][query] of each consumer warpgroup's 64 keys.
    T ds[2][64 * kBlockCols];
    alignas(16) float2 lse_delta[kStages][kBlockCols];
    int64_t q_col_delta[kBlockCols];
    int64_t dout_col_delta[kBlockCols];
    int token_col_delta[kBlockCols];
    int col_offset[kBlockCols];
    int4 row_axis[kBlockRows][kMaxRank];       // per key row: {j, inverse window begin, end, 0}
    int4 warp_box[kConsumerWarps][kMaxRank];   // per warp: {union begin, end, intersection begin, end}
    WalkAxis walk[kMaxRank];
    uint64_t full[kStages], empty[kStages], kv_full;
    // Per consumer warpgroup: its dQ of a tile [query][kDqStride] in float32, the
    // source of the bulk reduce-adds (16-byte aligned rows).
    alignas(16) float dq[2][kBlockCols][kDqStride];
    // d rpb (RpbBins): per warpgroup, a tile's dS^T summed by relative position; the
    // key rows' and the columns' parts of their bin indices; per warpgroup the bias
    // index of bin 0 less the key and query tile origins, and the bins' extents. In
    // shared memory: held in registers across the loop they spilled (head dim 128).
    float rpb_bins[2][kRpbBins];
    int row_bin[kBlockRows];
    int col_bin[kBlockCols];
    int4 rpb_base[2], rpb_extent;
  };
  static constexpr int kSharedBytes = int(sizeof(SharedStorage)) + 1024;  // room to align the base

  // 16-byte chunk c of row r of a tile of kRows rows (wgmma.cuh's layout).
  template <int kRows>
  __device__ static constexpr int chunk_index(int r, int c) {
    return (c >> 3) * kRows * 8 + r * 8 + ((c & 7) ^ (r & 7));
  }
  __device__ static constexpr int col_chunk_index(int r, int c) { return chunk_index<kBlockCols>(r, c); }
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) fused_backward_key_wgmma_kernel(const __grid_constant__ BackwardParams p) {
  using T = typename Cfg::Element;
  constexpr int kRows = Cfg::kBlockRows, kCols = Cfg::kBlockCols, kChunks = Cfg::kChunks;
  constexpr int kColBlocks = Cfg::kColBlocks, kHeadDim = Cfg::kHeadDim, kStages = Cfg::kStages;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (ptx::smem_address(smem_raw) & 1023)) & 1023);
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_base);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const GridTile& shape = p.kv_shape;
  const Neighborhood& nb = p.nb;

  // ---- which CTA: B x kv heads x key tiles ------------------------------------------
  int64_t linear = blockIdx.x;
  const int64_t tile = linear % p.kv_tiles;
  linear /= p.kv_tiles;
  const int hk = int(linear % p.kv_heads);
  const int64_t b = linear / p.kv_heads;
  int group[kMaxRank], lg[kMaxRank], k_origin[kMaxRank];
  if (!detail_bwd::decode_tile(nb, p.kv_tiles_per_group, shape.row_log2, tile, group, k_origin, lg)) return;
  // The queries of this key tile: the inverse-window union's computed ones.
  const detail_bwd::Box qbox = detail_bwd::key_tile_queries(p, group, k_origin, lg);
  int tiles_per_head = 1;
  for (int a = 0; a < kMaxRank; ++a) tiles_per_head *= ceil_div(qbox.r[a].size(), shape.col(a));
  const int total_tiles = tiles_per_head * p.heads_per_kv;

  // ---- per-CTA tables -----------------------------------------------------------------
  detail_bwd::fill_col_tables(p, smem, kCols, tid, Cfg::kThreads);
  if (tid == 0) {
    for (int a = 0; a < kMaxRank; ++a)
      smem.walk[a] = WalkAxis{qbox.r[a].begin, qbox.r[a].end, ceil_div(qbox.r[a].size(), shape.col(a)), group[a]};
    for (int stage = 0; stage < kStages; ++stage) {
      // Every producer thread's copies, and with TMA one more arrival: the thread
      // that arms the stage with the bytes of its Q and dO copies.
      pipeline::init(&smem.full[stage], p.key_pass_tma ? 129 : 128);
      pipeline::init(&smem.empty[stage], Cfg::kConsumerThreads);
    }
    pipeline::init(&smem.kv_full, 128);
    pipeline::fence_init();
  }
  if (Cfg::kRpb && p.d_rpb) {  // d rpb: the bins' tables (both warpgroups' bins have the same extents), bins zeroed
    for (int n = tid; n < kRows; n += Cfg::kThreads) {
      int off[kMaxRank];
      shape.row_offset(n, off);
      smem.row_bin[n] = RpbBins::of(shape, n / 64).row_part(shape, off);
    }
    for (int n = tid; n < kCols; n += Cfg::kThreads) {
      int off[kMaxRank];
      shape.col_offset(n, off);
      smem.col_bin[n] = RpbBins::of(shape, 0).col_part(off);
    }
    for (int i = tid; i < 2 * Cfg::kRpbBins; i += Cfg::kThreads) smem.rpb_bins[i / Cfg::kRpbBins][i % Cfg::kRpbBins] = 0.f;
    if (tid < 2) {
      const RpbBins bins = RpbBins::of(shape, tid);
      int base[kMaxRank];
      for (int a = 0; a < kMaxRank; ++a) base[a] = bins.first[a] - (shape.col(a) - 1) + k_origin[a] + nb.axis[a].kernel - 1;
      smem.rpb_base[tid] = make_int4(base[0], base[1], base[2], 0);
      smem.rpb_extent = make_int4(bins.extent[0], bins.extent[1], bins.extent[2], bins.count());
    }
  }
  const bool consumer = warp < Cfg::kConsumerWarps;
  const int my_row[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's keys (consumers)
  detail_bwd::KeyWarp key_warp{true, true};
  if (consumer) {
    if (t4 == 0)
      for (int i = 0; i < 2; ++i) detail_bwd::neighborhood_key_row_axis(p, smem, group, k_origin, lg, my_row[i]);
    key_warp = detail_bwd::neighborhood_key_warp(p, smem, group, k_origin, lg, warp, lane);
  }
  __syncthreads();  // tables, windows, mbarriers

  // A query tile's Q and dO rows by TMA (one thread): a copy per 64-column slab of
  // each, the tile's rows in the order of col_offset (row-major over the tile box).
  // Rows past the walk land as they are (or zero past the grid): their lse and delta
  // are zero and the mask drops their scores, so their P and dS are exact zeros.
  auto copy_query_rows_by_tma = [&](const QueryTile& qtile, int stage) {
    TmaTile t;
    t.batch = b;
    t.head = hk * p.heads_per_kv + qtile.head;
    for (int a = 0; a < kMaxRank; ++a) {
      t.group[a] = qtile.group[a];
      t.origin[a] = qtile.origin[a];
    }
    pipeline::arrive_expect_tx(&smem.full[stage], uint32_t(sizeof(smem.q[0]) + sizeof(smem.dout[0])));
    const uint32_t q_stage = ptx::smem_address(smem.q[stage]), dout_stage = ptx::smem_address(smem.dout[stage]);
    int32_t c[kTmaMaxDims];
#pragma unroll
    for (int slab = 0; slab < kHeadDim / 64; ++slab) {  // unrolled: the tile and coordinates stay in registers
      t.slab = slab;
      const uint32_t at = uint32_t(slab) * kCols * 128;
      tma_coordinates(p.q_view, nb, t, c);
      tma::load(q_stage + at, &p.q_map, &smem.full[stage], c, p.q_view.dims);
      tma_coordinates(p.dout_view, nb, t, c);
      tma::load(dout_stage + at, &p.dout_map, &smem.full[stage], c, p.dout_view.dims);
    }
  };

  // ---- producer: K and V once, then every query tile into the ring -----------------------
  if (!consumer) {
    pipeline::release_registers<Cfg::kProducerRegisters>();
    const int load_tid = tid - Cfg::kConsumerThreads;
    const int chunk = load_tid % kChunks, chunk_col = chunk * Cfg::kVec;
#pragma unroll 1
    for (int r = load_tid / kChunks; r < kRows; r += 128 / kChunks) {
      int j[kMaxRank], token[kMaxRank];
      const bool valid = detail_bwd::neighborhood_key_row(p, group, k_origin, lg, r, j, token);
      const bool k_ok = valid && chunk_col < p.dim, v_ok = valid && chunk_col < p.dim_v;
      const int dst = Cfg::template chunk_index<kRows>(r, chunk) * Cfg::kVec;
      const T* k_src = static_cast<const T*>(p.k);
      const T* v_src = static_cast<const T*>(p.v);
      ptx::cp_async_16(ptx::smem_address(&smem.k[dst]), k_ok ? k_src + p.k_layout.offset(b, token, hk) + chunk_col : k_src,
                       k_ok ? 16 : 0);
      ptx::cp_async_16(ptx::smem_address(&smem.v[dst]), v_ok ? v_src + p.v_layout.offset(b, token, hk) + chunk_col : v_src,
                       v_ok ? 16 : 0);
    }
    pipeline::arrive_after_copies(&smem.kv_full);
    if (p.key_pass_tma && load_tid == 0) {
      tma::prefetch(&p.q_map);
      tma::prefetch(&p.dout_map);
    }
#pragma unroll 1
    for (int it = 0; it < total_tiles; ++it) {
      const int stage = it % kStages;
      pipeline::wait(&smem.empty[stage], ((it / kStages) & 1) ^ 1);
      const QueryTile qtile = query_tile<false>(nb, shape, smem.walk, it);
      const detail_bwd::ColSource<T> src = detail_bwd::col_source<T>(p, qtile, b, hk);
      if (p.key_pass_tma) {
        if (load_tid == 0) copy_query_rows_by_tma(qtile, stage);
        detail_bwd::load_lse_delta<kCols, 128>(p, smem, src, stage, load_tid);
      } else {
        detail_bwd::load_query_tile<Cfg, 128, 1>(p, smem, src, stage, load_tid);
      }
      pipeline::arrive_after_copies(&smem.full[stage]);
    }
    pipeline::wait_all_copies();
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  pipeline::claim_registers<Cfg::kConsumerRegisters>();
  const int wg = warp / 4;                  // keys 64 wg .. 64 wg + 63
  const int wg_warp = warp & 3;
  const bool has_rpb = Cfg::kRpb && p.rpb != nullptr;
  const bool rpb_grad = Cfg::kRpb && p.d_rpb != nullptr;
  float dk[kHeadDim / 2], dv[kHeadDim / 2];  // this thread's part of the warpgroup's 64 x kHeadDim
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) dk[i] = dv[i] = 0.f;
  const uint32_t k_tile = ptx::smem_address(smem.k), v_tile = ptx::smem_address(smem.v);
  const uint32_t q0 = ptx::smem_address(smem.q[0]), dout0 = ptx::smem_address(smem.dout[0]);
  const uint32_t ds_tile = ptx::smem_address(smem.ds[wg]);
  constexpr uint32_t kStageBytes = sizeof(smem.q[0]);
  constexpr uint32_t kSlab = 128;  // bytes per row of a 64-column slab
  float(*dq_rows)[Cfg::kDqStride] = smem.dq[wg];
  pipeline::wait(&smem.kv_full, 0);

#pragma unroll 1
  for (int it = 0; it < total_tiles; ++it) {
    const int stage = it % kStages;
    pipeline::wait(&smem.full[stage], (it / kStages) & 1);
    // cp.async wrote (generic proxy) what wgmma reads (async proxy).
    wgmma::fence_proxy_async();

    const QueryTile qtile = query_tile<false>(nb, shape, smem.walk, it);
    const int h = hk * p.heads_per_kv + qtile.head;
    int limit[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) limit[a] = qtile.end[a] - qtile.origin[a];
    const detail_bwd::KeyWarpTile wt =
        detail_bwd::key_warp_tile<kColBlocks>(shape, smem, warp, lane, qtile, limit, /*additional=*/false, key_warp, has_rpb);
    // A warpgroup instruction needs every warp: the warpgroup computes the tile when
    // any of its warps' key boxes reaches it (read by every thread: uniform).
    bool computed = false;
    for (int w = 4 * wg; w < 4 * wg + 4; ++w) {
      bool hit = true;
      for (int a = 0; a < kMaxRank; ++a) {
        const int4 box = smem.warp_box[w][a];  // {union begin, union end, ...}; empty: idle
        hit &= qtile.origin[a] < box.y && qtile.origin[a] + shape.col(a) > box.x;
      }
      computed |= hit;
    }

    const uint32_t q_stage = q0 + stage * kStageBytes, dout_stage = dout0 + stage * kStageBytes;
    if (computed) {
      // S^T = K Q^T and dP^T = V dO^T: m64n64 per 16 of the head dim, K and V rows of
      // this warpgroup as A, the tile's Q and dO rows as B (both K-major).
      float s[kColBlocks][4], dp[kColBlocks][4];
      wgmma::fence_operands<kColBlocks * 4>(&s[0][0]);
      wgmma::fence_operands<kColBlocks * 4>(&dp[0][0]);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t in_row = (kk & 3) * 32;  // 16 elements of a 64-column slab
        const uint32_t a_off = (kk >> 2) * kRows * kSlab + wg * 64 * kSlab + in_row;
        const uint32_t b_off = (kk >> 2) * kCols * kSlab + in_row;
        wgmma::mma_ss<T, kCols>(&s[0][0], wgmma::descriptor(k_tile + a_off, 16, 1024),
                                wgmma::descriptor(q_stage + b_off, 16, 1024), /*accumulate=*/kk > 0);
      }
      wgmma::commit_group();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t in_row = (kk & 3) * 32;
        const uint32_t a_off = (kk >> 2) * kRows * kSlab + wg * 64 * kSlab + in_row;
        const uint32_t b_off = (kk >> 2) * kCols * kSlab + in_row;
        wgmma::mma_ss<T, kCols>(&dp[0][0], wgmma::descriptor(v_tile + a_off, 16, 1024),
                                wgmma::descriptor(dout_stage + b_off, 16, 1024), /*accumulate=*/kk > 0);
      }
      wgmma::commit_group();
      const float4* lse_delta4 = reinterpret_cast<const float4*>(smem.lse_delta[stage]);
      // P^T while dP^T runs.
      wgmma::wait_group<1>();
      wgmma::fence_operands<kColBlocks * 4>(&s[0][0]);
      detail_bwd::key_scores_to_base2<T>(s, 0, wt.active, wt.needs_mask, /*additional=*/false, p, smem.row_axis,
                                         my_row, qtile, limit, h, has_rpb, t4);
      detail_bwd::key_probabilities(s, 0, lse_delta4, t4);
      wgmma::wait_group<0>();
      wgmma::fence_operands<kColBlocks * 4>(&dp[0][0]);
      detail_bwd::key_score_gradients(dp, s, dp, 0, lse_delta4, t4);  // dp holds dS^T now
      if (rpb_grad) {  // d rpb: dS^T into this warpgroup's bins (masked pairs are exact zeros)
        float* tile_bins = smem.rpb_bins[wg];
#pragma unroll
        for (int j = 0; j < kColBlocks; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (dp[j][e] != 0.f)
              atomicAdd(&tile_bins[smem.row_bin[my_row[e >> 1]] - smem.col_bin[8 * j + 2 * t4 + (e & 1)]], dp[j][e]);
      }

      // dV += P^T dO and dK += dS^T Q: one m64 x head dim x 16 product per 16
      // queries, P^T and dS^T from registers (the C layout of two n8 blocks is the A
      // layout of k16), dO and Q MN-major (their 64-column slabs kCols rows apart).
      uint32_t a_p[kColBlocks / 2][4], a_ds[kColBlocks / 2][4];
#pragma unroll
      for (int kb = 0; kb < kColBlocks / 2; ++kb) {
        a_p[kb][0] = ptx::pack2<T>(s[2 * kb][0], s[2 * kb][1]);
        a_p[kb][1] = ptx::pack2<T>(s[2 * kb][2], s[2 * kb][3]);
        a_p[kb][2] = ptx::pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
        a_p[kb][3] = ptx::pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
        a_ds[kb][0] = ptx::pack2<T>(dp[2 * kb][0], dp[2 * kb][1]);
        a_ds[kb][1] = ptx::pack2<T>(dp[2 * kb][2], dp[2 * kb][3]);
        a_ds[kb][2] = ptx::pack2<T>(dp[2 * kb + 1][0], dp[2 * kb + 1][1]);
        a_ds[kb][3] = ptx::pack2<T>(dp[2 * kb + 1][2], dp[2 * kb + 1][3]);
      }
      wgmma::fence_operands<kHeadDim / 2>(dv);
      wgmma::fence_operands<kHeadDim / 2>(dk);
      wgmma::fence_operands<kColBlocks * 2>(&a_p[0][0]);
      wgmma::fence_operands<kColBlocks * 2>(&a_ds[0][0]);
      wgmma::fence();
#pragma unroll
      for (int kb = 0; kb < kColBlocks / 2; ++kb)
        wgmma::mma_rs<T, kHeadDim>(dv, a_p[kb], wgmma::descriptor(dout_stage + kb * 16 * kSlab, kCols * kSlab, 1024),
                                   /*accumulate=*/true);
#pragma unroll
      for (int kb = 0; kb < kColBlocks / 2; ++kb)
        wgmma::mma_rs<T, kHeadDim>(dk, a_ds[kb], wgmma::descriptor(q_stage + kb * 16 * kSlab, kCols * kSlab, 1024),
                                   /*accumulate=*/true);
      wgmma::commit_group();
      // dS^T to shared memory for dQ = dS K: [key][query] of this warpgroup's keys,
      // one 64-column slab; the 8 rows of a warp's store hit 8 different bank
      // groups (the swizzle). a_ds[kb][r]: row g + 8 (r % 2) of the warp, queries
      // 16 kb + 8 (r / 2) + 2 t4 and the next. The last tile's dQ product, which
      // read these rows, completed before this warpgroup left it.
      T* ds_rows = smem.ds[wg];
#pragma unroll
      for (int kb = 0; kb < kColBlocks / 2; ++kb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = 16 * wg_warp + g + 8 * (r & 1), col = 16 * kb + 8 * (r >> 1) + 2 * t4;
          *reinterpret_cast<uint32_t*>(&ds_rows[Cfg::template chunk_index<64>(row, col / 8) * 8 + col % 8]) = a_ds[kb][r];
        }
      wgmma::wait_group<0>();
      wgmma::fence_operands<kHeadDim / 2>(dv);
      wgmma::fence_operands<kHeadDim / 2>(dk);
    }
    pipeline::arrive(&smem.empty[stage]);

    // ---- dQ = dS K over this warpgroup's keys, added to the workspace ----------------
    if (computed && p.dq_accum != nullptr) {
      // dS^T written by ordinary stores (generic proxy) is read by wgmma next.
      wgmma::fence_proxy_async();
      pipeline::named_barrier<128>(1 + wg);  // this warpgroup's 64 rows of dS^T (barriers 1, 2)
      // Stage the warp's 16 rows (queries 16 wg_warp + g (+ 8)) once its lanes' bulk
      // reduce-adds of the last tile have read them; then lane r < 16 adds row r.
      ptx::bulk_wait_read<0>();
      __syncwarp();
      // A = dS (queries x keys) from dS^T as stored (MN-major); B = this warpgroup's
      // K rows as stored (MN-major), one 64-column slab of the head dim at a time
      // (at once, the 64 accumulators beside dK and dV spilled 252 bytes).
#pragma unroll 1
      for (int slab = 0; slab < kHeadDim / 64; ++slab) {
        float dq[32];
        wgmma::fence_operands<32>(dq);
        wgmma::fence();
#pragma unroll
        for (int kb = 0; kb < 4; ++kb)
          wgmma::mma_ss<T, 64, /*kTransA=*/true, /*kTransB=*/true>(
              dq, wgmma::descriptor(ds_tile + kb * 16 * kSlab, 64 * kSlab, 1024),
              wgmma::descriptor(k_tile + slab * kRows * kSlab + (64 * wg + 16 * kb) * kSlab, kRows * kSlab, 1024),
              /*accumulate=*/kb > 0);
        wgmma::commit_group();
        wgmma::wait_group<0>();
        wgmma::fence_operands<32>(dq);
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i)
            *reinterpret_cast<float2*>(&dq_rows[16 * wg_warp + g + 8 * i][64 * slab + 8 * j + 2 * t4]) =
                make_float2(dq[4 * j + 2 * i], dq[4 * j + 2 * i + 1]);
      }
      wgmma::fence_proxy_async();  // the bulk copies read shared memory through the async proxy
      __syncwarp();
      const int n = 16 * wg_warp + lane;
      if (lane < 16 && detail_bwd::col_valid(smem.col_offset[n], limit)) {
        const int64_t row = detail_bwd::col_workspace_row(p, smem, qtile, b, n);
        ptx::bulk_reduce_add(p.dq_accum + (row * p.heads + h) * p.dim, ptx::smem_address(dq_rows[n]), p.dim * 4);
        ptx::bulk_commit();
      }
    }

    // ---- d rpb: the tile's bins added to d_rpb, one atomic per bin, and zeroed --------
    if (computed && rpb_grad) {
      pipeline::named_barrier<128>(1 + wg);  // every thread of the warpgroup binned the tile
      const int4 base = smem.rpb_base[wg], extent = smem.rpb_extent;
      float* tile_bins = smem.rpb_bins[wg];
      for (int i = tid & 127; i < extent.w; i += 128) {
        const float sum = tile_bins[i];
        if (sum == 0.f) continue;
        tile_bins[i] = 0.f;
        const int index[kMaxRank] = {i / (extent.y * extent.z) + base.x - qtile.origin[0],
                                     i / extent.z % extent.y + base.y - qtile.origin[1],
                                     i % extent.z + base.z - qtile.origin[2]};
        atomicAdd(p.d_rpb + p.drpb_layout.offset(h, index), sum);
      }
      pipeline::named_barrier<128>(1 + wg);  // the bins are zero again before the next tile's
    }
  }
  ptx::bulk_wait<0>();  // this thread's bulk reduce-adds completed

  // ---- epilogue: dK = scale * sum dS^T Q and dV, staged through this warp's rows ----------
  // Every dQ product has read K. (Barrier 3: 1 and 2 are the warpgroups' own, which
  // the other warpgroup may still be using with another count.)
  pipeline::named_barrier<Cfg::kConsumerThreads>(3);
#pragma unroll
  for (int d = 0; d < kHeadDim / 8; ++d)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = my_row[i], col = 8 * d + 2 * t4;
      const int at = Cfg::template chunk_index<kRows>(r, col / 8) * 8 + col % 8;
      store2<T>(&smem.k[at], dk[4 * d + 2 * i] * p.scale, dk[4 * d + 2 * i + 1] * p.scale);
      store2<T>(&smem.v[at], dv[4 * d + 2 * i], dv[4 * d + 2 * i + 1]);
    }
  __syncwarp();
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = warp * 16 + idx / kChunks, c = idx % kChunks, col = c * Cfg::kVec;
    int j[kMaxRank], token[kMaxRank];
    if (!detail_bwd::neighborhood_key_row(p, group, k_origin, lg, r, j, token)) continue;
    const int at = Cfg::template chunk_index<kRows>(r, c) * 8;
    if (p.d_k && col < p.dim)
      *reinterpret_cast<uint4*>(static_cast<T*>(p.d_k) + p.dk_layout.offset(b, token, hk) + col) =
          *reinterpret_cast<const uint4*>(&smem.k[at]);
    if (p.d_v && col < p.dim_v)
      *reinterpret_cast<uint4*>(static_cast<T*>(p.d_v) + p.dv_layout.offset(b, token, hk) + col) =
          *reinterpret_cast<const uint4*>(&smem.v[at]);
  }
}

// Whether a wgmma key pass is compiled for (T, head dim).
template <class T, int kHeadDim>
inline constexpr bool kHasWgmmaKeyPass = sizeof(T) == 2 && (kHeadDim == 64 || kHeadDim == 128);

// Launches the wgmma key pass over a problem's neighborhood key tiles.
template <class T, int kHeadDim>
cudaError_t launch_fused_backward_key_wgmma(const BackwardParams& p, cudaStream_t stream) {
  using Cfg = WgmmaKeyPassConfig<T, kHeadDim>;
  if ((p.rpb || p.d_rpb) && !Cfg::kRpb) return cudaErrorInvalidValue;  // the planner takes mma.sync for these
  auto kernel = fused_backward_key_wgmma_kernel<Cfg>;
  if (const cudaError_t e = allow_shared_memory<fused_backward_key_wgmma_kernel<Cfg>>(Cfg::kSharedBytes); e != cudaSuccess)
    return e;
  const int64_t blocks = int64_t(p.batch) * p.kv_heads * p.kv_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), Cfg::kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
