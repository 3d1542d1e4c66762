// SPDX-License-Identifier: Apache-2.0
// Fused neighborhood attention forward on tensor cores (mma.sync, sm_80+; wgmma, sm_90a).
//
// One CTA computes one query tile (a box of one dilation group) for one head. Its
// keys are the union of its queries' windows (a box, by monotonicity of windows),
// walked in key tiles that are double-buffered in shared memory by cp.async. Each
// warp owns kMTiles boxes of 16 queries (compiled kernels use 1; see plan.cpp);
// for every key tile and box it
//   - skips the tile when the tile misses the union of the box's windows,
//   - predicates off each 8-key chunk that misses that union (ballot over chunks),
//   - applies the element mask only when the tile is not inside the intersection
//     of the box's windows (or when an RPB must be added),
// then runs the online softmax and P·V with P kept in registers. The M additional
// tokens follow as plain key tiles. Out and lse are written once.
//
// Two instruction paths share this body (ForwardConfig::kWgmma):
//   - mma.sync (sm_80+): m16n8k16 for float16 / bfloat16; for float32 three tf32
//     m16n8k8 products per product (common/mma.cuh), each k-step summed apart and
//     added by FADD. Fragments via ldmatrix (32-bit V by plain loads, see P·V); a
//     warp's chunks that no query of its box sees are predicated off.
//   - wgmma (sm_90a): S = Q K^T and O += P V are each a warpgroup instruction per 16
//     of K, with Q, K and V read by the tensor cores from 128-byte-swizzled shared
//     memory and P from registers. A key tile is computed whole once any warp of the
//     warpgroup needs it (the mask zeroes the rest), and skipped only when none does.
//     With 4 warps the CTA is one warpgroup that loads its own tiles (two stages,
//     cp.async, a CTA barrier per tile). With 8 warps it is warp-specialized, as
//     FlashAttention-3 is: two consumer warpgroups of 64 queries each and a
//     producer warpgroup that loads K and V into a ring of kStages stages,
//     synchronised by mbarriers (pipeline.cuh); the consumers never wait for each
//     other, so one's softmax runs under the other's wgmmas, except with ping-pong
//     (the default for 128-key tiles), where they take turns to issue their
//     products (named barriers; ForwardParams::pingpong). The producer is one
//     thread issuing TMA copies of boxes of the token grid where the tensors allow
//     (ForwardParams::use_tma; plan.hpp, forward_tma_views), else the warpgroup's
//     cp.async.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/pipeline.cuh"
#include "cuda/common/shared_memory.hpp"
#include "cuda/common/ptx.cuh"
#include "cuda/common/tma.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fused/params.hpp"

// The forward's overlap schedule (ForwardConfig::kOverlap): off unless the build asks.
#ifndef NBHD_FUSED_FORWARD_OVERLAP
#define NBHD_FUSED_FORWARD_OVERLAP 0
#endif

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_, int kWarps_, int kBlockKV_, int kMTiles_ = 1, bool kWgmma_ = false>
struct ForwardConfig {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  static constexpr int kWarps = kWarps_;
  // 16-query boxes per warp. Two share every K and V fragment a warp loads from
  // shared memory (half the ldmatrix and per-tile work per mma, as FlashAttention-2's
  // 32 rows per warp), while masks and chunk skipping stay per 16-query box.
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kBoxes = kWarps * kMTiles;  // 16-query boxes per CTA
  static constexpr int kBlockQ = 16 * kBoxes;
  static constexpr int kBlockKV = kBlockKV_;
  static constexpr bool kWgmma = kWgmma_;
  // wgmma with 8 warps: two consumer warpgroups and a producer warpgroup.
  static constexpr bool kSpecialized = kWgmma && kWarps == 8;
  static constexpr int kConsumerThreads = 32 * kWarps;  // the threads that own queries
  static constexpr int kLoadThreads = kSpecialized ? 128 : kConsumerThreads;
  static constexpr int kThreads = kConsumerThreads + (kSpecialized ? 128 : 0);
  // K/V stages in flight. Two (one tile ahead) when the math warps load; the
  // producer ring holds 128 KB at head dim 128 and 96 KB at 64, what fits beside Q
  // at 1 CTA per SM: 4 or 6 stages of 64-key tiles, 2 or 3 of 128-key tiles. Head
  // dim 256: 128 KB, two stages of 64-key tiles beside Q's 64 KB (~200 KB in all).
  static constexpr int kRingBytes = (kHeadDim >= 128 ? 128 : 96) << 10;
  static constexpr int kStages = !kSpecialized ? 2 : kRingBytes / (2 * kBlockKV * kHeadDim * int(sizeof(T)));
  // Registers per thread after the producer hands its spare ones to the consumers
  // (setmaxnreg; 128 x producer + 256 x consumer fits the 64 K register file). The
  // producer's load loop spilled at 56 and 72 (ptxas, head dim 128, 64-key tiles);
  // the consumers do not at 208. 128-key tiles hold twice the scores: their
  // consumers take 240 and still spill 256 bytes (head dim 128; 308 at 224), while
  // the producer fits in 24 with one spilled value. Head dim 256 holds 128 output
  // floats per consumer thread: 240 as well.
  static constexpr bool kWideConsumers = kBlockKV == 128 || kHeadDim == 256;
  static constexpr int kProducerRegisters = kWideConsumers ? 24 : 88;
  static constexpr int kConsumerRegisters = kWideConsumers ? 240 : 208;
  // Intra-warpgroup overlap (FlashAttention-3's; a build with
  // NBHD_FUSED_FORWARD_OVERLAP=ON, a candidate not yet timed: docs/performance.md,
  // "Forward v11"): tile t's S = Q K^T is issued together with tile t-1's P V, and
  // t's softmax runs while that P V is in flight. A tile's stage is then held until
  // its P V completes, one tile later, so it needs a ring of three stages or more
  // (64-key tiles at head dims 64 and 128).
  static constexpr bool kOverlap = kSpecialized && kStages >= 3 && NBHD_FUSED_FORWARD_OVERLAP;
  // float32 runs three tf32 products per product (mma.sync m16n8k8; common/mma.cuh).
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;   // 16-byte chunks per row
  // k extent of one mma.sync: a k-step of S = Q K^T spans two chunks of the head dim
  // for every dtype; a k-step of O += P V spans kStepK / 8 n8 blocks of P.
  static constexpr int kStepK = kTf32 ? 8 : 16;
  static constexpr int kNBlocks = kBlockKV / 8;  // n8 blocks of a score tile
  static constexpr int kDBlocks = kHeadDim / 8;  // n8 blocks of the output
  // CTAs per SM the register budget must allow (255 / 168 / 128 registers at 4 warps):
  // small head dims leave room for more warps to hide load latency, which is what
  // memory-bound shapes (NAT: head dim 32, 7x7 windows) need.
  // float32 tiles take twice the shared memory: 2-3 CTAs per SM at most (H100).
  static constexpr int kMinBlocksPerSM =
      kTf32 ? (kHeadDim <= 32 ? 3 : 2)
      : kWarps == 4 && kBlockKV == 64 && kMTiles == 1 ? (kHeadDim <= 32 ? 4 : kHeadDim <= 64 ? 3 : 2)
      : kWarps == 4                                   ? 2
                                                      : 1;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim bucket must be 32, 64, 128 or 256");
  static_assert(!kWgmma || ((kWarps == 4 || kWarps == 8) && kMTiles == 1 && kHeadDim >= 64 &&
                             (kHeadDim <= 128 || (kSpecialized && kBlockKV == 64)) &&
                             (kBlockKV == 64 || (kSpecialized && kBlockKV == 128 && kHeadDim == 128))),
                "wgmma kernels: one or two consumer warpgroups, head dim 64 or 128 (256 with two and 64-key "
                "tiles), 64 keys per tile (128 with two at head dim 128)");
  static_assert(!kSpecialized || kStages >= 2, "the producer ring needs two stages");
  static_assert(!kWgmma || !kTf32, "wgmma kernels are 16-bit");
  static_assert(kBlockKV % 16 == 0 && kBlockKV <= 128, "key tile must be a multiple of 16 keys");

  struct SharedStorage {
    T q[kBlockQ * kHeadDim];  // reused to stage the output
    // kStages stages: tile it + 1 (.. it + kStages - 1) loads while tile it
    // computes. (One buffer each for K and V, K loading during P·V and V during
    // Q·K^T as FlashAttention-2 does, was 10-15% slower on an H200 with 2 CTAs per
    // SM: the loads were not hidden.)
    T k[kStages][kBlockKV * kHeadDim];
    T v[kStages][kBlockKV * kHeadDim];
    // Per key-tile row: element offset from the tile origin's row in k and v, and
    // the row's offset in the tile box (axis a in bits 10a..10a+9). Computed once
    // per CTA, so a tile's loads are an add and three compares per row.
    int64_t k_row_delta[kBlockKV];
    int64_t v_row_delta[kBlockKV];
    int key_row_offset[kBlockKV];
    // Per query row and axis: its group index and window {j, begin, end, unused};
    // an empty window marks a row past the grid. Kept here, not in registers: only
    // masked tiles and the epilogue read it.
    int4 row_axis[kBlockQ][kMaxRank];
    // Per 16-query box and axis: {union begin, union end, intersection begin,
    // intersection end} of its queries' windows.
    int4 box_windows[kBoxes][kMaxRank];
    // Warp-specialized kernels: per stage, "loaded" and "read by every consumer
    // warp"; and "Q loaded".
    uint64_t full[kStages], empty[kStages], q_full;
  };
  // wgmma's swizzled operands must start on 1024-byte boundaries: room to align the
  // dynamic shared memory's base (every array above is a multiple of 1 KB).
  static constexpr int kSharedBytes = int(sizeof(SharedStorage)) + (kWgmma ? 1024 : 0);

  // mma.sync: 16-byte chunk `c` of row `r` lives at chunk c ^ swizzle(r): the 8 rows
  // one ldmatrix reads then hit 8 different bank groups (rows are 64-512 bytes
  // apart). The swizzle depends on r % 8 only, and every ldmatrix reads 8 rows
  // starting at a multiple of 8, so a lane's swizzle is fixed: swizzle(lane % 8).
  // wgmma: the 128-byte swizzle of wgmma.cuh, in slabs of 64 columns of a tile of
  // kRows rows.
  __device__ static constexpr int swizzle(int r) { return kChunks >= 8 ? (r & 7) : ((r >> 1) & 3); }
  template <int kRows>
  __device__ static constexpr int chunk_index(int r, int c) {
    if constexpr (kWgmma) return (c >> 3) * kRows * 8 + r * 8 + ((c & 7) ^ (r & 7));
    else return r * kChunks + (c ^ swizzle(r));
  }
  static constexpr int kRowBytes = kChunks * 16;
  // Element (r, col) of a tile of kRows rows.
  template <int kRows>
  __device__ static constexpr int element_index(int r, int col) {
    return chunk_index<kRows>(r, col / kVec) * kVec + col % kVec;
  }
};

namespace detail_fwd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Online softmax of one tile of a 16-query box (the thread's rows g and g + 8): the
// running max (base-2 units) and the thread-partial sum per row move, the scores
// become probabilities, and `rescale` is what O must be multiplied by. score_scale
// multiplies the scores first: the softmax scale where it was not applied yet (it is
// positive there, so it commutes with the max), else 1.
template <int kNBlocks>
__device__ __forceinline__ void online_softmax(float (&s)[kNBlocks][4], float (&row_max)[2], float (&row_sum)[2],
                                               float score_scale, float (&rescale)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float tile_max = kNegInf;
#pragma unroll
    for (int j = 0; j < kNBlocks; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
    const float mx = quad_max(fmaxf(row_max[i], tile_max * score_scale));
    // A row with no key yet keeps -inf; exp2 against 0 then gives exact zeros.
    const float ref = mx == kNegInf ? 0.f : mx;
    rescale[i] = ptx::exp2_approx(row_max[i] - ref);
    row_max[i] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kNBlocks; ++j) {
      s[j][2 * i] = ptx::exp2_approx(fmaf(s[j][2 * i], score_scale, -ref));
      s[j][2 * i + 1] = ptx::exp2_approx(fmaf(s[j][2 * i + 1], score_scale, -ref));
      sum += s[j][2 * i] + s[j][2 * i + 1];
    }
    row_sum[i] = row_sum[i] * rescale[i] + sum;
  }
}

// O of one 16-query box times the rows' rescale factors. Once the running maxima
// settle, most tiles leave them unchanged: skipped when no row of the box moved (64
// multiplies per thread at head dim 128).
template <int kDBlocks>
__device__ __forceinline__ void rescale_o(float (&o)[kDBlocks][4], const float (&rescale)[2]) {
  if (__any_sync(0xffffffffu, rescale[0] != 1.f || rescale[1] != 1.f)) {
#pragma unroll
    for (int d = 0; d < kDBlocks; ++d) {
      o[d][0] *= rescale[0];
      o[d][1] *= rescale[0];
      o[d][2] *= rescale[1];
      o[d][3] *= rescale[1];
    }
  }
}

// O += P V for a consumer warpgroup (wgmma): one m64 x head dim x 16 product per 16
// keys, P from registers (the C layout of two n8 blocks of S is the A layout of
// k16), V's rows as K (its 64-column slabs kBlockKV rows apart). One wgmma per 16
// keys and 128 output columns: head dim 256 takes two, its second half of O at n8
// block 16. Issues only: the caller fences, commits and waits. (Issuing only the
// 16-key blocks some query box reaches, each wgmma under its own branch, made ptxas
// serialize them, C7520: 9-22% slower; docs/performance.md, "Forward v12".)
template <class Cfg>
__device__ __forceinline__ void issue_pv(float (&o)[Cfg::kDBlocks][4], const uint32_t (&p)[Cfg::kBlockKV / 16][4],
                                         uint32_t v_tile) {
  if constexpr (Cfg::kWgmma) {
    constexpr int kN = Cfg::kHeadDim < 128 ? Cfg::kHeadDim : 128;
#pragma unroll
    for (int kb = 0; kb < Cfg::kBlockKV / 16; ++kb)
#pragma unroll
      for (int half = 0; half < Cfg::kHeadDim / kN; ++half)
        wgmma::mma_rs<typename Cfg::Element, kN>(
          &o[half * kN / 8][0], p[kb],
          wgmma::descriptor(v_tile + (2 * half * Cfg::kBlockKV + kb * 16) * 128, Cfg::kBlockKV * 128, 1024),
          /*accumulate=*/true);
  }
}

// Per axis [begin, end) ranges of group indices, 3 axes.
struct Box {
  Range r[kMaxRank];
  __device__ bool empty() const { return r[0].size() <= 0 || r[1].size() <= 0 || r[2].size() <= 0; }
};

// The query tile a CTA computes, for one head of one batch: its group indices start
// at origin, its group's queries end at end (the group length, or where the query
// sub-box ends), and its windows are the group's (lg). hk: the head's kv head.
struct QueryTile {
  int64_t b;
  int h, hk;
  int group[kMaxRank], lg[kMaxRank], origin[kMaxRank], end[kMaxRank];
};

// The tile of CTA `block` (tiles, then heads, then batches). False for a CTA past its
// group's queries: the shorter dilation groups have fewer tiles.
__device__ __forceinline__ bool locate_query_tile(const ForwardParams& p, int64_t block, QueryTile& t) {
  const int64_t tile = block % p.tiles;
  block /= p.tiles;
  t.h = int(block % p.heads);
  t.b = block / p.heads;
  t.hk = t.h / p.heads_per_kv;
  int64_t rest = tile;
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const int d = p.nb.axis[a].dilation;
    const int per_axis = p.tiles_per_group[a] * d;
    const int ta = int(rest % per_axis);
    rest /= per_axis;
    t.group[a] = ta / p.tiles_per_group[a];
    t.lg[a] = p.nb.axis[a].group_length(t.group[a]);
    const Range in_box = group_indices(p.query_begin[a], p.query_end[a], t.group[a], d);
    t.end[a] = in_box.end;
    t.origin[a] = in_box.begin + ((ta % p.tiles_per_group[a]) << p.shape.q_log2[a]);
    if (t.origin[a] >= t.end[a]) return false;
  }
  return true;
}

// The tile's key box: the union of its queries' windows (those of its first and last
// query per axis, since windows never move backwards). Unwrapped on a periodic axis.
__device__ __forceinline__ Box key_box(const ForwardParams& p, const QueryTile& t) {
  Box kbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.nb.axis[a];
    const int last = imin(t.origin[a] + p.shape.q(a), t.end[a]) - 1;
    kbox.r[a] = {ax.window(t.origin[a], t.lg[a]).begin, ax.window(last, t.lg[a]).end};
  }
  return kbox;
}

}  // namespace detail_fwd

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM) fused_forward_kernel(const __grid_constant__ ForwardParams p) {
  using T = typename Cfg::Element;
  using Mma = nbhd::cuda::Mma<T>;  // the mma.sync path's products
  using detail_fwd::Box;
  using detail_fwd::kNegInf;
  constexpr int kBlockQ = Cfg::kBlockQ, kBlockKV = Cfg::kBlockKV, kChunks = Cfg::kChunks;
  constexpr int kNBlocks = Cfg::kNBlocks, kDBlocks = Cfg::kDBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw;
  if constexpr (Cfg::kWgmma) smem_base += (1024 - (ptx::smem_address(smem_raw) & 1023)) & 1023;
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_base);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const TileShape& shape = p.shape;

  // ---- which tile, head, batch; the tile's key box --------------------------------
  detail_fwd::QueryTile qt;
  if (!detail_fwd::locate_query_tile(p, blockIdx.x, qt)) return;
  const int64_t b = qt.b;
  const int h = qt.h, hk = qt.hk;
  const int(&group)[kMaxRank] = qt.group;
  const int(&lg)[kMaxRank] = qt.lg;
  const int(&q_origin)[kMaxRank] = qt.origin;
  const int(&q_end)[kMaxRank] = qt.end;
  const Box kbox = detail_fwd::key_box(p, qt);
  int key_tiles_axis[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) key_tiles_axis[a] = ceil_div(kbox.r[a].size(), shape.k(a));
  const int neighbor_tiles = key_tiles_axis[0] * key_tiles_axis[1] * key_tiles_axis[2];
  const int additional_tiles = ceil_div(p.additional_tokens, kBlockKV);
  const int total_tiles = neighbor_tiles + additional_tiles;

  // Key tiles are visited in row-major order over the key box; the loads run one
  // tile ahead of the compute, each with its own odometer (no divisions per tile).
  struct Odometer {
    int origin[kMaxRank];
    __device__ void advance(const Box& box, const TileShape& shape) {
      for (int a = kMaxRank - 1; a >= 0; --a) {
        origin[a] += shape.k(a);
        if (origin[a] < box.r[a].end || a == 0) return;
        origin[a] = box.r[a].begin;
      }
    }
  };
  auto token_of = [&](const int* j, int* token) {
    for (int a = 0; a < kMaxRank; ++a) token[a] = group[a] + p.nb.axis[a].dilation * j[a];
  };

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  // ---- loads ------------------------------------------------------------------
  // The loading threads: all of them, or the producer warpgroup's.
  const int load_tid = Cfg::kSpecialized ? tid - Cfg::kConsumerThreads : tid;
  auto load_q = [&]() {
    for (int idx = load_tid; idx < kBlockQ * kChunks; idx += Cfg::kLoadThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      int off[kMaxRank], j[kMaxRank], token[kMaxRank];
      shape.query_offset(r, off);
      bool valid = c * Cfg::kVec < p.dim;
      for (int a = 0; a < kMaxRank; ++a) {
        j[a] = q_origin[a] + off[a];
        valid &= j[a] < q_end[a];
      }
      const T* src = q_base;
      if (valid) {
        token_of(j, token);
        src = q_base + p.q_layout.offset(b, token, h) + c * Cfg::kVec;
      }
      ptx::cp_async_16(ptx::smem_address(&smem.q[Cfg::template chunk_index<kBlockQ>(r, c) * Cfg::kVec]), src,
                       valid ? 16 : 0);
    }
  };
  // Each loading thread copies one 16-byte column `chunk` of rows load_row,
  // load_row + step, ...
  constexpr int kRowStep = Cfg::kLoadThreads / kChunks;
  static_assert(Cfg::kLoadThreads % kChunks == 0 && kBlockKV % kRowStep == 0, "load mapping");
  const int chunk = load_tid % kChunks, load_row = load_tid / kChunks;
  for (int n = tid; n < kBlockKV; n += Cfg::kThreads) {
    int off[kMaxRank];
    shape.key_offset(n, off);
    int64_t dk = 0, dv = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      dk += int64_t(off[a]) * p.nb.axis[a].dilation * p.k_layout.axis[a];
      dv += int64_t(off[a]) * p.nb.axis[a].dilation * p.v_layout.axis[a];
    }
    smem.k_row_delta[n] = dk;
    smem.v_row_delta[n] = dv;
    smem.key_row_offset[n] = off[0] | (off[1] << 10) | (off[2] << 20);
  }
  Odometer load_tile{{kbox.r[0].begin, kbox.r[1].begin, kbox.r[2].begin}};
  Odometer compute_tile = load_tile;
  const int chunk_col = chunk * Cfg::kVec;  // this thread's first column
  const bool k_chunk_ok = chunk_col < p.dim, v_chunk_ok = chunk_col < p.dim_v;

  // Where tile `it`'s rows come from: the tile origin's row in k and v, and the
  // extent of the tile inside the key box (rows past it are zero-filled). Computed
  // once per tile for K and V.
  struct TileSource {
    const T* k;
    const T* v;
    int limit[kMaxRank];
    int first_additional;  // -1 for a neighborhood tile
    // A tile of a periodic axis's key box may reach past either end of the group
    // (the box is unwrapped): its rows then wrap one by one (load_wrapped_kv).
    bool wraps;
    int origin[kMaxRank];
  };
  const int key_extent[kMaxRank] = {shape.k(0), shape.k(1), shape.k(2)};
  auto tile_source = [&](int it) {
    TileSource src;
    if (it < neighbor_tiles) {
      for (int a = 0; a < kMaxRank; ++a) {
        src.origin[a] = load_tile.origin[a];
        src.limit[a] = kbox.r[a].end - load_tile.origin[a];
      }
      src.wraps = tile_wraps(p.nb, group, src.origin, key_extent);
      int token[kMaxRank];
      nbhd::cuda::token_of(p.nb, group, src.origin, token);  // wrapped: the origin's row exists
      src.k = k_base + p.k_layout.offset(b, token, hk);
      src.v = v_base + p.v_layout.offset(b, token, hk);
      src.first_additional = -1;
      load_tile.advance(kbox, shape);
    } else {
      const int m0 = (it - neighbor_tiles) * kBlockKV;
      const int first[kMaxRank] = {0, 0, m0};  // row m0 exists: the tile is not empty
      src.k = static_cast<const T*>(p.additional_k) + p.ak_layout.offset(b, first, hk);
      src.v = static_cast<const T*>(p.additional_v) + p.av_layout.offset(b, first, hk);
      src.first_additional = m0;
      src.wraps = false;
    }
    return src;
  };
  // A tile that wraps (the key box's rows past its end read nothing, as in load_kv):
  // the tiles at a periodic axis's seam, each row's token on its own. (Rows from the
  // ordinary deltas less a period past the seam were 18% faster on a 1x1 periodic
  // problem, and 2-6% slower on others through the producer's registers: e61c788,
  // docs/performance.md, "Periodic axes".)
  auto load_wrapped_kv = [&](const TileSource& src, T* k_dst, T* v_dst) {
    int lg[kMaxRank];  // the periodic axes' group lengths, once per tile
    for (int a = 0; a < kMaxRank; ++a) lg[a] = p.nb.axis[a].periodic ? p.nb.axis[a].group_length(group[a]) : 0;
    for (int i = 0; i < kBlockKV / kRowStep; ++i) {
      const int n = load_row + i * kRowStep;
      const int packed = smem.key_row_offset[n];
      const bool valid = (packed & 1023) < src.limit[0] && ((packed >> 10) & 1023) < src.limit[1] &&
                         (packed >> 20) < src.limit[2];
      int token[kMaxRank];
      packed_token(p.nb, group, lg, src.origin, packed, token);
      const int dst = Cfg::template chunk_index<kBlockKV>(n, chunk) * Cfg::kVec;
      const bool k_ok = valid && k_chunk_ok, v_ok = valid && v_chunk_ok;
      ptx::cp_async_16(ptx::smem_address(&k_dst[dst]), k_ok ? k_base + p.k_layout.offset(b, token, hk) + chunk_col : src.k,
                       k_ok ? 16 : 0);
      ptx::cp_async_16(ptx::smem_address(&v_dst[dst]), v_ok ? v_base + p.v_layout.offset(b, token, hk) + chunk_col : src.v,
                       v_ok ? 16 : 0);
    }
  };
  // Loads tile `src` into `stage`: each thread copies 16-byte column `chunk` of its
  // rows of K and V. Invalid rows and columns past the head dim read nothing (src
  // size 0); their address stays at the tile origin's row, which exists. A tile
  // inside the key box skips the per-row bounds test. (With the tile kind decided per
  // row, a row of one tensor took about 31 SASS instructions: half of what a warp
  // issued per tile at head dim 128, commit e135cb1.)
  auto load_kv = [&](const TileSource& src, int stage) {
    T* k_dst = smem.k[stage];
    T* v_dst = smem.v[stage];
    if (src.wraps) {
      load_wrapped_kv(src, k_dst, v_dst);
    } else if (src.first_additional < 0) {
      const bool whole = src.limit[0] >= shape.k(0) && src.limit[1] >= shape.k(1) && src.limit[2] >= shape.k(2);
#pragma unroll
      for (int i = 0; i < kBlockKV / kRowStep; ++i) {
        const int n = load_row + i * kRowStep;
        bool valid = true;
        if (!whole) {
          const int packed = smem.key_row_offset[n];
          valid = (packed & 1023) < src.limit[0] && ((packed >> 10) & 1023) < src.limit[1] &&
                  (packed >> 20) < src.limit[2];
        }
        const int dst = Cfg::template chunk_index<kBlockKV>(n, chunk) * Cfg::kVec;
        const bool k_ok = valid && k_chunk_ok, v_ok = valid && v_chunk_ok;
        ptx::cp_async_16(ptx::smem_address(&k_dst[dst]), src.k + (k_ok ? smem.k_row_delta[n] + chunk_col : 0),
                         k_ok ? 16 : 0);
        ptx::cp_async_16(ptx::smem_address(&v_dst[dst]), src.v + (v_ok ? smem.v_row_delta[n] + chunk_col : 0),
                         v_ok ? 16 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBlockKV / kRowStep; ++i) {
        const int n = load_row + i * kRowStep;
        const bool valid = src.first_additional + n < p.additional_tokens;
        const int dst = Cfg::template chunk_index<kBlockKV>(n, chunk) * Cfg::kVec;
        const bool k_ok = valid && k_chunk_ok, v_ok = valid && v_chunk_ok;
        ptx::cp_async_16(ptx::smem_address(&k_dst[dst]), src.k + (k_ok ? n * p.ak_layout.axis[2] + chunk_col : 0),
                         k_ok ? 16 : 0);
        ptx::cp_async_16(ptx::smem_address(&v_dst[dst]), src.v + (v_ok ? n * p.av_layout.axis[2] + chunk_col : 0),
                         v_ok ? 16 : 0);
      }
    }
  };

  // The TMA producer (one thread; ForwardParams::use_tma): Q as one copy per warp box
  // and 64-column slab into the rows that box owns, then each key tile as one copy
  // per slab of K and of V. Boxes past the grid land as zeros, and keys past the key
  // box as they are (the consumers mask both); their bytes complete the barriers.
  auto produce_by_tma = [&]() {
    if constexpr (Cfg::kSpecialized) {
      constexpr int kSlabs = Cfg::kHeadDim / 64;
      static_assert(sizeof(T) == 2, "a slab of 64 columns is one 128-byte swizzled row");
      tma::prefetch(&p.tma.q);
      tma::prefetch(&p.tma.k);
      tma::prefetch(&p.tma.v);
      TmaTile t;
      t.batch = b;
      t.head = h;
      for (int a = 0; a < kMaxRank; ++a) t.group[a] = group[a];
      int32_t c[kTmaMaxDims];
      const uint32_t q_tile = ptx::smem_address(smem.q);
      pipeline::arrive_expect_tx(&smem.q_full, uint32_t(sizeof(smem.q)));
      for (int box = 0; box < Cfg::kBoxes; ++box) {
        int off[kMaxRank];
        shape.warp_offset(box, off);
        for (int a = 0; a < kMaxRank; ++a) t.origin[a] = q_origin[a] + off[a];
#pragma unroll
        for (int slab = 0; slab < kSlabs; ++slab) {  // unrolled: the tile and coordinates stay in registers
          t.slab = slab;
          tma_coordinates(p.tma.q_view, p.nb, t, c);
          tma::load(q_tile + (t.slab * kBlockQ + box * 16) * 128, &p.tma.q, &smem.q_full, c, p.tma.q_view.dims);
        }
      }
      t.head = hk;
      for (int it = 0; it < neighbor_tiles; ++it) {
        const int stage = it % Cfg::kStages;
        pipeline::wait(&smem.empty[stage], ((it / Cfg::kStages) & 1) ^ 1);
        pipeline::arrive_expect_tx(&smem.full[stage], uint32_t(sizeof(smem.k[0]) + sizeof(smem.v[0])));
        for (int a = 0; a < kMaxRank; ++a) t.origin[a] = load_tile.origin[a];
        const uint32_t k_tile = ptx::smem_address(smem.k[stage]), v_tile = ptx::smem_address(smem.v[stage]);
#pragma unroll
        for (int slab = 0; slab < kSlabs; ++slab) {
          t.slab = slab;
          const uint32_t at = uint32_t(slab) * kBlockKV * 128;
          tma_coordinates(p.tma.k_view, p.nb, t, c);
          tma::load(k_tile + at, &p.tma.k, &smem.full[stage], c, p.tma.k_view.dims);
          tma_coordinates(p.tma.v_view, p.nb, t, c);
          tma::load(v_tile + at, &p.tma.v, &smem.full[stage], c, p.tma.v_view.dims);
        }
        load_tile.advance(kbox, shape);
      }
    }
  };

  // ---- this warp's queries ------------------------------------------------------
  // Warp w owns 16-query boxes w * kMTiles + m. Of box m, rows g and g + 8 belong to
  // this thread (mma C layout); my_row[m][i] is row 16 * box + g + 8 * i. The rows'
  // windows go to shared memory (written by one lane of each quad). Producer warps
  // own no queries.
  constexpr int kM = Cfg::kMTiles;
  const bool owns_queries = warp < Cfg::kWarps;
  int my_row[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int i = 0; i < 2; ++i) my_row[m][i] = (warp * kM + m) * 16 + g + 8 * i;
  if (t4 == 0 && owns_queries) {
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        int off[kMaxRank];
        shape.query_offset(my_row[m][i], off);
        bool valid = true;
        for (int a = 0; a < kMaxRank; ++a) valid &= q_origin[a] + off[a] < q_end[a];
        for (int a = 0; a < kMaxRank; ++a) {
          const int j = q_origin[a] + off[a];
          const Range w = valid ? p.nb.axis[a].window(j, lg[a]) : Range{0, 0};
          smem.row_axis[my_row[m][i]][a] = make_int4(j, w.begin, w.end, 0);
        }
      }
  }
  // Union and intersection of each box's windows (first and last valid query per
  // axis: window begins and ends never decrease along an axis); empty for a box
  // past the grid.
  bool box_idle[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int box = warp * kM + m;
    int off[kMaxRank];
    shape.warp_offset(box, off);
    box_idle[m] = !owns_queries;
    for (int a = 0; a < kMaxRank; ++a) box_idle[m] |= q_origin[a] + off[a] >= q_end[a];
    for (int a = 0; a < kMaxRank && lane == 0 && owns_queries; ++a) {
      const Axis& ax = p.nb.axis[a];
      const int first = q_origin[a] + off[a];
      const int last = imin(first + shape.w(a), q_end[a]) - 1;
      const Range wf = ax.window(first, lg[a]), wl = ax.window(imax(last, first), lg[a]);
      smem.box_windows[box][a] = box_idle[m] ? make_int4(0, 0, 0, 0) : make_int4(wf.begin, wl.end, wl.begin, wf.end);
    }
  }
  if constexpr (Cfg::kSpecialized) {
    if (tid == 0) {
      // A TMA stage is one thread's arrival and its copies' bytes; a cp.async one
      // every producer thread's arrival.
      const uint32_t producer_arrivals = p.use_tma ? 1 : Cfg::kLoadThreads;
      for (int stage = 0; stage < Cfg::kStages; ++stage) {
        pipeline::init(&smem.full[stage], producer_arrivals);
        pipeline::init(&smem.empty[stage], Cfg::kWarps);
      }
      pipeline::init(&smem.q_full, producer_arrivals);
      pipeline::fence_init();
    }
  }
  __syncthreads();  // key row offsets, windows and mbarriers are in place

  // ---- main loop --------------------------------------------------------------------
  float o[kM][kDBlocks][4];
  float row_max[kM][2], row_sum[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int d = 0; d < kDBlocks; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][d][e] = 0.f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_max[m][i] = kNegInf;
      row_sum[m][i] = 0.f;
    }
  }
  const bool has_rpb = p.rpb != nullptr;
  const float rpb_log2 = kLog2e;

  // Shared-memory addresses of this lane's ldmatrix rows (see Cfg::swizzle):
  // Q rows 16 * box + (lane % 8) + 8 * ((lane / 8) % 2); K rows 8 * (lane / 16) + lane % 8
  // of each 16-key pair; V rows (lane % 8) + 8 * ((lane / 8) % 2) of each 16-key block.
  const int lane_swizzle = Cfg::swizzle(lane & 7);
  const uint32_t q_lane_base =
      ptx::smem_address(smem.q) + (warp * kM * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
  const uint32_t k_lane_base = ptx::smem_address(smem.k[0]) + ((lane >> 4) * 8 + (lane & 7)) * Cfg::kRowBytes;
  const uint32_t v_lane_base = ptx::smem_address(smem.v[0]) + ((lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;

  if constexpr (Cfg::kSpecialized) {
    if (!owns_queries) {
      // The producer: Q, then every key tile into the ring, each stage once the
      // consumers are done with its previous tile.
      pipeline::release_registers<Cfg::kProducerRegisters>();
      if (p.use_tma) {
        if (load_tid == 0) produce_by_tma();
        return;
      }
      load_q();
      pipeline::arrive_after_copies(&smem.q_full);
      for (int it = 0; it < total_tiles; ++it) {
        const int stage = it % Cfg::kStages;
        pipeline::wait(&smem.empty[stage], ((it / Cfg::kStages) & 1) ^ 1);
        load_kv(tile_source(it), stage);
        pipeline::arrive_after_copies(&smem.full[stage]);
      }
      pipeline::wait_all_copies();
      return;
    }
    pipeline::claim_registers<Cfg::kConsumerRegisters>();
    pipeline::wait(&smem.q_full, 0);
  } else {
    load_q();
    load_kv(tile_source(0), 0);
    ptx::cp_async_commit();
  }
  const int warpgroup = warp / 4;
  // Ping-pong (ForwardParams::pingpong): the consumer warpgroups take turns to issue
  // their products, S then P V, so that one's softmax runs while the other's wgmmas
  // keep the tensor cores busy (FlashAttention-3's schedule). Warpgroup w waits for
  // its turn on barrier kTurnBarrier + w and hands it over on the other's; the
  // second hands one over first, so the first starts. Each warpgroup takes two turns
  // per tile, computed or skipped, so the counts match; the second's last hand-over
  // would have no taker and is left out.
  constexpr int kTurnBarrier = 1;
  const bool pingpong = Cfg::kSpecialized && p.pingpong;
  auto take_turn = [&]() {
    if (pingpong) pipeline::named_barrier<Cfg::kConsumerThreads>(kTurnBarrier + warpgroup);
  };
  auto pass_turn = [&](bool last_turn) {
    pipeline::named_arrive_if<Cfg::kConsumerThreads>(pingpong && !(last_turn && warpgroup == 1),
                                                      kTurnBarrier + 1 - warpgroup);
  };
  pipeline::named_arrive_if<Cfg::kConsumerThreads>(pingpong && warpgroup == 1, kTurnBarrier);

  // ---- per-tile decisions --------------------------------------------------------
  // Which chunks of tile `it` (origin: its first key's group indices) each box of
  // this warp may attend (active), which boxes must mask it element by element, and
  // (warp-specialized) whether this warpgroup computes it at all. They depend only
  // on the tile's origin and the boxes' windows, not on its data. (Made one tile
  // ahead, under the P V product, they were 2-6% slower on an H100: 633db63,
  // docs/performance.md, "Forward v10 candidate".)
  struct TileDecisions {
    uint32_t active[kM];  // bit j: n8 chunk j has keys box m may attend
    bool needs_mask[kM];
    uint32_t any_active;
    bool compute;  // warp-specialized: some box of this warpgroup reaches the tile
  };
  auto decide = [&](int it, const int* origin) {
    TileDecisions d;
    const bool additional = it >= neighbor_tiles;
    d.any_active = 0;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      d.active[m] = 0;
      d.needs_mask[m] = true;
      if (box_idle[m]) continue;
      const int box = warp * kM + m;
      if (!additional) {
        // Chunk j holds keys 8j..8j+7 of the tile: fixed coordinates on axes 0 and 1
        // (the innermost tile extent is a multiple of 8), a run of 8 on axis 2.
        bool lane_active = false;
        if (lane < kNBlocks) {
          int off[kMaxRank];
          shape.key_offset(lane * 8, off);
          lane_active = true;
          for (int a = 0; a < kMaxRank; ++a) {
            const int4 w = smem.box_windows[box][a];  // {union begin, union end, ...}
            const int lo = origin[a] + off[a], hi = lo + (a == kMaxRank - 1 ? 8 : 1);
            lane_active &= lo < w.y && hi > w.x && lo < kbox.r[a].end;
          }
        }
        d.active[m] = __ballot_sync(0xffffffffu, lane_active);
        // Inside every window of the box and inside the key box: no element mask.
        d.needs_mask[m] = has_rpb;
        for (int a = 0; a < kMaxRank; ++a) {
          const int4 w = smem.box_windows[box][a];  // {..., intersection begin, end}
          const int lo = origin[a], hi = origin[a] + shape.k(a);
          d.needs_mask[m] |= lo < w.z || hi > w.w || hi > kbox.r[a].end;
        }
      } else {
        const int m0 = (it - neighbor_tiles) * kBlockKV;
        d.active[m] = __ballot_sync(0xffffffffu, lane < kNBlocks && m0 + lane * 8 < p.additional_tokens);
        d.needs_mask[m] = m0 + kBlockKV > p.additional_tokens;
      }
      d.any_active |= d.active[m];
    }
    d.compute = additional;
    if constexpr (Cfg::kSpecialized) {
      for (int box = 4 * warpgroup; box < 4 * warpgroup + 4 && !d.compute; ++box) {
        bool hit = true;
        for (int a = 0; a < kMaxRank; ++a) {
          const int4 w = smem.box_windows[box][a];  // {union begin, union end, ...}
          hit &= origin[a] < imin(w.y, kbox.r[a].end) && origin[a] + shape.k(a) > w.x;
        }
        d.compute = hit;
      }
    }
    return d;
  };
  // Overlap: the P of the last computed tile, packed as P V's A operand, and its
  // stage (-1: none pending). Its P V is issued with the next computed tile's S, or
  // alone by a skipped tile or after the loop.
  uint32_t pending_p[kBlockKV / 16][4];
  int pending_stage = -1;
  if constexpr (Cfg::kOverlap)
#pragma unroll
    for (int kb = 0; kb < kBlockKV / 16; ++kb)
#pragma unroll
      for (int r = 0; r < 4; ++r) pending_p[kb][r] = 0u;
  // A stage's tile is read by every wgmma of this warp: the producer may refill it.
  auto release_stage = [&](int released) {
    __syncwarp();
    if (lane == 0) pipeline::arrive(&smem.empty[released]);
  };
  // Overlap: the pending P V alone, issued and waited for on the caller's path (a
  // skipped tile's branch, or after the loop), then its stage released.
  auto complete_pending_pv = [&]() {
    if constexpr (Cfg::kOverlap) {
      wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);
      wgmma::fence_operands<kBlockKV / 4>(&pending_p[0][0]);
      wgmma::fence();
      detail_fwd::issue_pv<Cfg>(o[0], pending_p, ptx::smem_address(smem.v[pending_stage]));
      wgmma::commit_group();
      wgmma::wait_group<0>();
      wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);
      release_stage(pending_stage);
      pending_stage = -1;
#pragma unroll
      for (int kb = 0; kb < kBlockKV / 16; ++kb)
#pragma unroll
        for (int r = 0; r < 4; ++r) pending_p[kb][r] = 0u;
    }
  };
  for (int it = 0; it < total_tiles; ++it) {
    const int stage = it % Cfg::kStages;
    if constexpr (Cfg::kSpecialized) {
      pipeline::wait(&smem.full[stage], (it / Cfg::kStages) & 1);
    } else if (it + 1 < total_tiles) {
      load_kv(tile_source(it + 1), (it + 1) % Cfg::kStages);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    // cp.async wrote (generic proxy) what wgmma reads (async proxy): each reader
    // fences after the barrier that made the copies visible to it.
    if constexpr (Cfg::kWgmma) wgmma::fence_proxy_async();

    const bool additional = it >= neighbor_tiles;
    int origin[kMaxRank] = {0, 0, 0};
    if (!additional)
      for (int a = 0; a < kMaxRank; ++a) origin[a] = compute_tile.origin[a];
    const TileDecisions decided = decide(it, origin);
    const uint32_t(&active)[kM] = decided.active;
    const bool(&needs_mask)[kM] = decided.needs_mask;
    const uint32_t any_active = decided.any_active;
    // The barrier: this tile (and Q) landed. A warpgroup instruction needs every
    // warp, so the wgmma path computes the tile when any warp of the warpgroup needs
    // it; the warp-specialized one decided from the boxes' windows, with no barrier.
    bool compute_tile_now;
    if constexpr (Cfg::kSpecialized) {
      compute_tile_now = decided.compute;
    } else if constexpr (Cfg::kWgmma) {
      compute_tile_now = __syncthreads_or(any_active != 0);
    } else {
      __syncthreads();
      compute_tile_now = any_active != 0;
    }

    float s[kM][kNBlocks][4];
    // Box m's scores of this tile to base-2 units; on tiles that need it, the bias and
    // the mask. An unmasked tile with a positive scale stays unscaled: its scale
    // folds into the softmax's subtraction (one FFMA per score instead of FMUL +
    // FADD), and the part returns true.
    auto scale_and_mask = [&](int m) {
      const bool fold_scale = !needs_mask[m] && p.scale_log2 > 0.f;
      if (!needs_mask[m]) {
        if (!fold_scale)
#pragma unroll
          for (int j = 0; j < kNBlocks; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[m][j][e] *= p.scale_log2;
      } else if (additional) {
        const int valid_keys = p.additional_tokens - (it - neighbor_tiles) * kBlockKV;
#pragma unroll
        for (int j = 0; j < kNBlocks; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = 8 * j + 2 * t4 + (e & 1);
            s[m][j][e] = n < valid_keys ? s[m][j][e] * p.scale_log2 : kNegInf;
          }
      } else {
        // Per row and axis, the keys of this tile (offsets from its origin) the row sees.
        int lo[2][kMaxRank], hi[2][kMaxRank];
        int64_t bias_base[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          bias_base[i] = int64_t(h) * p.rpb_layout.head;
          for (int a = 0; a < kMaxRank; ++a) {
            const int4 ra = smem.row_axis[my_row[m][i]][a];  // {j, window begin, window end}
            lo[i][a] = ra.y - origin[a];
            hi[i][a] = imin(ra.z, kbox.r[a].end) - origin[a];
            bias_base[i] += int64_t(origin[a] - ra.x + p.nb.axis[a].kernel - 1) * p.rpb_layout.axis[a];
          }
        }
#pragma unroll
        for (int j = 0; j < kNBlocks; ++j) {
          const bool chunk_on = (active[m] >> j) & 1u;
          int off[kMaxRank];
          shape.key_offset(8 * j, off);  // the chunk's first key; the run is along axis 2
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, off2 = off[2] + 2 * t4 + (e & 1);
            const bool keep = chunk_on && off[0] >= lo[i][0] && off[0] < hi[i][0] && off[1] >= lo[i][1] &&
                              off[1] < hi[i][1] && off2 >= lo[i][2] && off2 < hi[i][2];
            s[m][j][e] = keep ? s[m][j][e] * p.scale_log2 : kNegInf;
          }
        }
        if (has_rpb) {
#pragma unroll
          for (int j = 0; j < kNBlocks; ++j) {
            int off[kMaxRank];
            shape.key_offset(8 * j, off);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (s[m][j][e] == kNegInf) continue;
              const int i = e >> 1, off2 = off[2] + 2 * t4 + (e & 1);
              const int64_t ro = bias_base[i] + off[0] * p.rpb_layout.axis[0] + off[1] * p.rpb_layout.axis[1] +
                                 off2 * p.rpb_layout.axis[2];
              const float bias = p.rpb_is_float32 ? __ldg(static_cast<const float*>(p.rpb) + ro)
                                                  : to_float(static_cast<const T*>(p.rpb)[ro]);
              s[m][j][e] += bias * rpb_log2;
            }
          }
        }
      }
      return fold_scale;
    };
    if (compute_tile_now) {
      if constexpr (Cfg::kWgmma) {
        // S = Q K^T: one m64 x kBlockKV x 16 product per 16 of the head dim; the
        // descriptor steps 32 bytes along a 128-byte row, then to the next slab.
        const uint32_t q_tile = ptx::smem_address(smem.q), k_tile = ptx::smem_address(smem.k[stage]);
        take_turn();
        wgmma::fence_operands<kNBlocks * 4>(&s[0][0][0]);
        if constexpr (Cfg::kOverlap) {
          wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);
          wgmma::fence_operands<kBlockKV / 4>(&pending_p[0][0]);
        }
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
          const uint32_t in_row = (kk & 3) * 32;  // 16 elements of a 64-column slab
          const uint64_t a_desc =
              wgmma::descriptor(q_tile + (kk >> 2) * kBlockQ * 128 + warpgroup * 64 * 128 + in_row, 16, 1024);
          const uint64_t b_desc = wgmma::descriptor(k_tile + (kk >> 2) * kBlockKV * 128 + in_row, 16, 1024);
          wgmma::mma_ss<T, kBlockKV>(&s[0][0][0], a_desc, b_desc, /*accumulate=*/kk > 0);
        }
        wgmma::commit_group();
        if constexpr (Cfg::kOverlap) {
          // The last computed tile's P V behind this S, on every computed tile: with
          // no P pending it adds zeros (the current stage's V). Issued and waited for
          // on every path alike, as ptxas needs (a wgmma in flight across a branch
          // serializes them all: C7518).
          detail_fwd::issue_pv<Cfg>(o[0], pending_p, ptx::smem_address(smem.v[pending_stage >= 0 ? pending_stage : stage]));
          wgmma::commit_group();
          pass_turn(it + 1 == total_tiles);  // one turn per tile: S and P V together
          wgmma::wait_group<1>();            // S landed; P V may still run
        } else {
          pass_turn(false);
          wgmma::wait_group<0>();
        }
        wgmma::fence_operands<kNBlocks * 4>(&s[0][0][0]);
      } else {
        // S = Q K^T. Each K fragment serves every box of the warp; the mma of a chunk
        // no query of a box can see is predicated off. A k-step is two 16-byte
        // chunks of the head dim (16 halves or 8 floats).
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
          for (int j = 0; j < kNBlocks; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[m][j][e] = 0.f;
        const uint32_t k_stage = k_lane_base + stage * uint32_t(sizeof(smem.k[0]));
        // float32 k-steps one at a time: unrolled, ptxas hoisted the split fragments
        // of every k-step and spilled (255 registers, 96-140 bytes at head dim 64).
#pragma unroll(Cfg::kTf32 ? 1 : kChunks / 2)
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          typename Mma::A a[kM];
#pragma unroll
          for (int m = 0; m < kM; ++m)
            a[m] = Mma::load_a(q_lane_base + m * 16 * Cfg::kRowBytes + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
          const uint32_t k_col = ((2 * kk + ((lane >> 3) & 1)) ^ lane_swizzle) << 4;
#pragma unroll
          for (int pair = 0; pair < kNBlocks / 2; ++pair) {
            typename Mma::B b0, b1;
            Mma::load_b_nk(k_stage + pair * 16 * Cfg::kRowBytes + k_col, b0, b1);
#pragma unroll
            for (int m = 0; m < kM; ++m) {
              Mma::mma_promoted_if((active[m] >> (2 * pair)) & 1u, s[m][2 * pair], a[m], b0);
              Mma::mma_promoted_if((active[m] >> (2 * pair + 1)) & 1u, s[m][2 * pair + 1], a[m], b1);
            }
          }
        }
      }

#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const bool fold_scale = scale_and_mask(m);
        float rescale[2];
        detail_fwd::online_softmax(s[m], row_max[m], row_sum[m], fold_scale ? p.scale_log2 : 1.f, rescale);
        if constexpr (Cfg::kOverlap) {
          // O is the pending P V's accumulator, in flight: rescale it once that lands.
          wgmma::wait_group<0>();
          wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);
          if (pending_stage >= 0) release_stage(pending_stage);
        }
        detail_fwd::rescale_o(o[m], rescale);
      }

      // O += P V, P from registers (the C layout of two n8 blocks is the A layout of
      // k16); each V fragment serves every box of the warp.
      if constexpr (Cfg::kWgmma) {
        const uint32_t v_tile = ptx::smem_address(smem.v[stage]);
        uint32_t a[kBlockKV / 16][4];
#pragma unroll
        for (int kb = 0; kb < kBlockKV / 16; ++kb) {
          a[kb][0] = ptx::pack2<T>(s[0][2 * kb][0], s[0][2 * kb][1]);
          a[kb][1] = ptx::pack2<T>(s[0][2 * kb][2], s[0][2 * kb][3]);
          a[kb][2] = ptx::pack2<T>(s[0][2 * kb + 1][0], s[0][2 * kb + 1][1]);
          a[kb][3] = ptx::pack2<T>(s[0][2 * kb + 1][2], s[0][2 * kb + 1][3]);
        }
        if constexpr (Cfg::kOverlap) {
          // Issued with the next computed tile's S (or alone by a skipped tile or
          // after the loop); this tile's stage stays held until then.
#pragma unroll
          for (int kb = 0; kb < kBlockKV / 16; ++kb)
#pragma unroll
            for (int r = 0; r < 4; ++r) pending_p[kb][r] = a[kb][r];
          pending_stage = stage;
        } else {
          take_turn();
          wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);  // the rescale above lands first
          wgmma::fence_operands<kBlockKV / 4>(&a[0][0]);
          wgmma::fence();
          detail_fwd::issue_pv<Cfg>(o[0], a, v_tile);
          wgmma::commit_group();
          pass_turn(it + 1 == total_tiles);
          wgmma::wait_group<0>();
          wgmma::fence_operands<kDBlocks * 4>(&o[0][0][0]);
        }
      } else if constexpr (Cfg::kTf32) {
        // One k-step per n8 block of P, its keys reordered (Mma::a_from_accumulators),
        // so V's B fragments are read in that order, one float per lane (ldmatrix
        // cannot transpose 32-bit elements). Rows 2t, 2t + 1 and columns g of 8 dims
        // hit 32 banks through the swizzle (kChunks >= 8).
        const T* v_tile = smem.v[stage];
#pragma unroll
        for (int kb = 0; kb < kNBlocks; ++kb) {
          if (((any_active >> kb) & 1u) == 0) continue;
          bool on[kM];
          typename Mma::A a[kM];
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            on[m] = (active[m] >> kb) & 1u;
            a[m] = Mma::a_from_accumulators(s[m][kb]);
          }
#pragma unroll
          for (int d = 0; d < kDBlocks; ++d) {
            const typename Mma::B bv = Mma::make_b_paired(lane, [&](int k, int n) {
              return v_tile[Cfg::template element_index<kBlockKV>(8 * kb + k, 8 * d + n)];
            });
#pragma unroll
            for (int m = 0; m < kM; ++m) Mma::mma_promoted_if(on[m], o[m][d], a[m], bv);
          }
        }
      } else {
        const uint32_t v_stage = v_lane_base + stage * uint32_t(sizeof(smem.v[0]));
#pragma unroll
        for (int kb = 0; kb < kBlockKV / 16; ++kb) {
          if (((any_active >> (2 * kb)) & 3u) == 0) continue;
          bool on[kM];
          uint32_t a[kM][4];
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            on[m] = (active[m] >> (2 * kb)) & 3u;
            a[m][0] = ptx::pack2<T>(s[m][2 * kb][0], s[m][2 * kb][1]);
            a[m][1] = ptx::pack2<T>(s[m][2 * kb][2], s[m][2 * kb][3]);
            a[m][2] = ptx::pack2<T>(s[m][2 * kb + 1][0], s[m][2 * kb + 1][1]);
            a[m][3] = ptx::pack2<T>(s[m][2 * kb + 1][2], s[m][2 * kb + 1][3]);
          }
#pragma unroll
          for (int dp = 0; dp < kDBlocks / 2; ++dp) {
            uint32_t bv[4];
            ptx::ldmatrix_x4_trans(bv, v_stage + kb * 16 * Cfg::kRowBytes + (((2 * dp + (lane >> 4)) ^ lane_swizzle) << 4));
#pragma unroll
            for (int m = 0; m < kM; ++m) {
              ptx::mma_16816_if<T>(on[m], o[m][2 * dp], a[m], bv);
              ptx::mma_16816_if<T>(on[m], o[m][2 * dp + 1], a[m], bv + 2);
            }
          }
        }
      }
    } else if constexpr (Cfg::kOverlap) {
      // A skipped tile's one turn: it completes the pending P V, if any, issued and
      // waited for inside this branch.
      take_turn();
      if (pending_stage >= 0) complete_pending_pv();
      pass_turn(it + 1 == total_tiles);
    } else if (pingpong) {  // a skipped tile's two turns, with nothing to issue
      take_turn();
      pass_turn(false);
      take_turn();
      pass_turn(it + 1 == total_tiles);
    }
    if (!additional) compute_tile.advance(kbox, shape);
    if constexpr (Cfg::kSpecialized) {
      // Overlap: a computed tile's stage is released once its P V completes.
      if (!Cfg::kOverlap || !compute_tile_now) release_stage(stage);  // every lane's wgmmas on it completed
    } else {
      __syncthreads();  // the next iteration's loads overwrite this stage
    }
  }

  if (Cfg::kOverlap && pending_stage >= 0) complete_pending_pv();  // the last computed tile's P V

  // ---- epilogue: out = O / sum, staged through this warp's rows of smem.q ----------
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[m][i] = detail_fwd::quad_sum(row_sum[m][i]);
      inv[i] = row_sum[m][i] > 0.f ? 1.f / row_sum[m][i] : 0.f;
    }
#pragma unroll
    for (int d = 0; d < kDBlocks; ++d)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        T* dst = &smem.q[Cfg::template element_index<kBlockQ>(my_row[m][i], 8 * d + 2 * t4)];
        dst[0] = from_float<T>(o[m][d][2 * i] * inv[i]);
        dst[1] = from_float<T>(o[m][d][2 * i + 1] * inv[i]);
      }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  for (int idx = lane; idx < kM * 16 * kChunks; idx += 32) {
    const int rr = idx / kChunks, c = idx % kChunks, r = warp * kM * 16 + rr;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * Cfg::kVec < p.dim_v;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = q_origin[a] + off[a];
      valid &= j[a] < q_end[a];
    }
    if (!valid) continue;
    token_of(j, token);
    *reinterpret_cast<uint4*>(out + p.out_layout.offset(b, token, h) + c * Cfg::kVec) =
        *reinterpret_cast<const uint4*>(&smem.q[Cfg::template chunk_index<kBlockQ>(r, c) * Cfg::kVec]);
  }
  if (p.lse && t4 == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        int j[kMaxRank], token[kMaxRank];
        bool valid = true;
        for (int a = 0; a < kMaxRank; ++a) {
          const int4 ra = smem.row_axis[my_row[m][i]][a];
          j[a] = ra.x;
          valid &= ra.y < ra.z;
        }
        if (!valid) continue;
        token_of(j, token);
        p.lse[p.lse_layout.offset(b, token, h)] = (row_max[m][i] + log2f(row_sum[m][i])) * kLn2;
      }
  }
}

template <class Cfg>
cudaError_t launch_fused_forward(const ForwardParams& p, int64_t batch, cudaStream_t stream) {
  auto kernel = fused_forward_kernel<Cfg>;
  if (const cudaError_t e = allow_shared_memory<fused_forward_kernel<Cfg>>(Cfg::kSharedBytes); e != cudaSuccess) return e;
  const int64_t blocks = p.tiles * p.heads * batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), Cfg::kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
