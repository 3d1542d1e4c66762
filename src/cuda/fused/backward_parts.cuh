// SPDX-License-Identifier: Apache-2.0
// Named parts of the fused backward's key passes (backward_kernel.cuh, mma.sync;
// backward_wgmma_kernel.cuh, wgmma): which CTA, the per-CTA tables, the query-tile
// loads, which 8-query chunks a warp's keys see, the element mask of the key scores,
// and P^T and dS^T from them. Both key passes keep a warp's 16 keys x 8-query chunks
// in the m16n8 accumulator layout (rows g and g + 8, columns 2t and 2t + 1 of each
// chunk), which wgmma's m64nN repeats per warp, so these parts serve both.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/fused/backward_params.hpp"
#include "cuda/fused/backward_ptx.cuh"

namespace nbhd::cuda::fused::detail_bwd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per axis [begin, end) ranges of group indices, 3 axes.
struct Box {
  Range r[kMaxRank];
};

// 16-byte chunk `c` of row `r` of a tile with `chunks` chunks per row lives at
// c ^ swizzle(r): the 8 rows an ldmatrix reads hit 8 different bank groups. The
// swizzle depends on r % 8 only (see ForwardConfig).
__host__ __device__ constexpr int swizzle(int chunks, int r) { return chunks >= 8 ? (r & 7) : ((r >> 1) & 3); }

// Tile tokens, shared with the forward (tile_shape.hpp).
using nbhd::cuda::packed_token;
using nbhd::cuda::tile_wraps;
using nbhd::cuda::token_of;

// Index of a token in the dense [B, H, tokens] / [B, tokens, ...] workspaces: row-major
// over the computed queries (the query sub-box, else the grid). Affine in the token.
__device__ __forceinline__ int64_t flat_token(const BackwardParams& p, const int* token) {
  const int e1 = p.query_end[1] - p.query_begin[1], e2 = p.query_end[2] - p.query_begin[2];
  return (int64_t(token[0] - p.query_begin[0]) * e1 + (token[1] - p.query_begin[1])) * e2 + (token[2] - p.query_begin[2]);
}

// The token of workspace row `flat` (flat_token's inverse).
__device__ __forceinline__ void token_of_flat(const BackwardParams& p, int64_t flat, int* token) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const int extent = p.query_end[a] - p.query_begin[a];
    token[a] = p.query_begin[a] + int(flat % extent);
    flat /= extent;
  }
}

// The queries of group g on axis a that this call computes and a key of inverse
// window `w` may see: w clipped to the query sub-box's part of the group (empty,
// never negative, where they miss each other). A periodic axis's sub-box is the
// whole axis (backward_supports), where a window stays unwrapped.
__device__ __forceinline__ Range computed_queries(const BackwardParams& p, int a, int g, Range w) {
  if (p.nb.axis[a].periodic) return w;
  const Range box = group_indices(p.query_begin[a], p.query_end[a], g, p.nb.axis[a].dilation);
  const int begin = imax(w.begin, box.begin);
  return {begin, imax(begin, imin(w.end, box.end))};
}

// The key-pass CTA `tile` of one (batch, kv head): dilation group and origin of its
// key tile per axis. False for the empty tiles past a shorter group's end.
__device__ __forceinline__ bool decode_tile(const Neighborhood& nb, const int* tiles_per_group, const int* row_log2,
                                            int64_t tile, int* group, int* origin, int* lg) {
  bool inside = true;
#pragma unroll
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const int per_axis = tiles_per_group[a] * nb.axis[a].dilation;
    const int ta = int(tile % per_axis);
    tile /= per_axis;
    group[a] = ta / tiles_per_group[a];
    origin[a] = (ta % tiles_per_group[a]) << row_log2[a];
    lg[a] = nb.axis[a].group_length(group[a]);
    inside &= origin[a] < lg[a];
  }
  return inside;
}

// A query-tile CTA `tile` (the dq pass; tiles over the query sub-box, tile_grid):
// decode_tile's group, origin and group length lg (the windows'), the origin moved to
// the box's part of the group, and that part's end per axis. False for the empty
// tiles past a shorter group's end.
__device__ __forceinline__ bool decode_query_tile(const BackwardParams& p, const int* tiles_per_group,
                                                  const int* row_log2, int64_t tile, int* group, int* origin, int* end,
                                                  int* lg) {
  bool inside = decode_tile(p.nb, tiles_per_group, row_log2, tile, group, origin, lg);
#pragma unroll
  for (int a = 0; a < kMaxRank; ++a) {
    const Range part = group_indices(p.query_begin[a], p.query_end[a], group[a], p.nb.axis[a].dilation);
    origin[a] += part.begin;
    end[a] = part.end;
    inside &= origin[a] < end[a];
  }
  return inside;
}

// Per query-tile column n: element offsets from the tile origin's row in q and dO,
// token offset in the workspaces, offsets in the tile box (axis a in bits 10a..).
template <class Smem>
__device__ void fill_col_tables(const BackwardParams& p, Smem& smem, int n_cols, int first, int step) {
  const Neighborhood& nb = p.nb;
  for (int n = first; n < n_cols; n += step) {
    int off[kMaxRank];
    p.kv_shape.col_offset(n, off);
    int64_t dq = 0, ddo = 0;
    int dt = 0;
    const int e1 = p.query_end[1] - p.query_begin[1], e2 = p.query_end[2] - p.query_begin[2];
    const int token_stride[kMaxRank] = {e1 * e2, e2, 1};  // flat_token's
    for (int a = 0; a < kMaxRank; ++a) {
      const int step_a = off[a] * nb.axis[a].dilation;
      dq += int64_t(step_a) * p.q_layout.axis[a];
      ddo += int64_t(step_a) * p.dout_layout.axis[a];
      dt += step_a * token_stride[a];
    }
    smem.q_col_delta[n] = dq;
    smem.dout_col_delta[n] = ddo;
    smem.token_col_delta[n] = dt;
    smem.col_offset[n] = off[0] | (off[1] << 10) | (off[2] << 20);
  }
}

// Whether column `packed` (col_offset) of a query tile lies inside the walk.
__device__ __forceinline__ bool col_valid(int packed, const int* limit) {
  return (packed & 1023) < limit[0] && ((packed >> 10) & 1023) < limit[1] && (packed >> 20) < limit[2];
}

// Where a query tile's rows come from: the tile origin's row in q and dO and in the
// lse/delta workspace, and the tile's extent inside the walk per axis. A tile that
// wraps (tile_wraps) keeps the bases of batch b and head h instead, and its columns'
// offsets come from their tokens (col_offsets).
template <class T>
struct ColSource {
  const T* q;
  const T* dout;
  const float2* lse_delta;
  int limit[kMaxRank];
  bool wraps;
  int group[kMaxRank], origin[kMaxRank];
  int64_t b;
  int h;
};

template <class T>
__device__ __forceinline__ ColSource<T> col_source(const BackwardParams& p, const QueryTile& w, int64_t b, int hk) {
  ColSource<T> src;
  src.h = hk * p.heads_per_kv + w.head;
  src.b = b;
  int extent[kMaxRank], token[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    src.limit[a] = w.end[a] - w.origin[a];
    src.group[a] = w.group[a];
    src.origin[a] = w.origin[a];
    extent[a] = p.kv_shape.col(a);
  }
  src.wraps = tile_wraps(p.nb, w.group, w.origin, extent);
  if (src.wraps) token[0] = token[1] = token[2] = 0;
  else token_of(p.nb, w.group, w.origin, token);
  src.q = static_cast<const T*>(p.q) + p.q_layout.offset(b, token, src.h);
  src.dout = static_cast<const T*>(p.d_out) + p.dout_layout.offset(b, token, src.h);
  src.lse_delta =
      reinterpret_cast<const float2*>(p.lse_delta) + (b * p.heads + src.h) * p.tokens + flat_token(p, token);
  return src;
}

// Column n's offsets from the source's bases: in q, in dO, in the workspaces'
// tokens. From the tables where the tile does not wrap.
struct ColOffsets {
  int64_t q, dout;
  int token;
};
template <class T, class Smem>
__device__ __forceinline__ ColOffsets col_offsets(const BackwardParams& p, const Smem& smem, const ColSource<T>& src,
                                                  int n) {
  if (!src.wraps) return {smem.q_col_delta[n], smem.dout_col_delta[n], smem.token_col_delta[n]};
  int token[kMaxRank];
  packed_token(p.nb, src.group, src.origin, smem.col_offset[n], token);
  const int zero[kMaxRank] = {0, 0, 0};
  return {p.q_layout.offset(0, token, 0) - p.q_layout.offset(0, zero, 0),
          p.dout_layout.offset(0, token, 0) - p.dout_layout.offset(0, zero, 0),
          int(flat_token(p, token) - flat_token(p, zero))};
}

// The dense workspace row (b * tokens + token) of query-tile column n.
template <class Smem>
__device__ __forceinline__ int64_t col_workspace_row(const BackwardParams& p, const Smem& smem, const QueryTile& t,
                                                     int64_t b, int n) {
  int token[kMaxRank];
  int extent[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) extent[a] = p.kv_shape.col(a);
  if (tile_wraps(p.nb, t.group, t.origin, extent)) {
    packed_token(p.nb, t.group, t.origin, smem.col_offset[n], token);
    return b * p.tokens + flat_token(p, token);
  }
  token_of(p.nb, t.group, t.origin, token);
  return b * p.tokens + flat_token(p, token) + smem.token_col_delta[n];
}

// Copies a query tile's lse and delta into `stage` by kLoadThreads threads. Columns
// past the walk's end read nothing: zeros, so a masked probability is exp2(-inf - 0)
// = 0 whatever their Q and dO rows hold.
template <int kCols, int kLoadThreads, class Smem, class Source>
__device__ __forceinline__ void load_lse_delta(const BackwardParams& p, Smem& smem, const Source& src, int stage,
                                               int load_tid) {
  for (int n = load_tid; n < kCols; n += kLoadThreads) {
    const bool valid = col_valid(smem.col_offset[n], src.limit);
    const int token = valid ? col_offsets(p, smem, src, n).token : 0;
    ptx::cp_async_8(ptx::smem_address(&smem.lse_delta[stage][n]), src.lse_delta + token, valid ? 8 : 0);
  }
}

// Copies a query tile (Q and dO rows, lse and delta) into `stage` by kLoadThreads
// threads: thread `load_tid` copies 16-byte column load_tid % chunks of rows
// load_tid / chunks + i * step. Columns past the walk's end read nothing (zeros);
// the address stays at the tile origin. Cfg::col_chunk_index places chunks.
template <class Cfg, int kLoadThreads, int kUnroll, class Smem>
__device__ __forceinline__ void load_query_tile(const BackwardParams& p, Smem& smem,
                                                const ColSource<typename Cfg::Element>& src, int stage, int load_tid) {
  constexpr int kChunks = Cfg::kChunks, kCols = Cfg::kBlockCols, kVec = Cfg::kVec;
  constexpr int kRowStep = kLoadThreads / kChunks;
  static_assert(kLoadThreads % kChunks == 0 && kCols % kRowStep == 0, "load mapping");
  const int chunk = load_tid % kChunks, load_row = load_tid / kChunks, chunk_col = chunk * kVec;
  const bool q_chunk_ok = chunk_col < p.dim, dout_chunk_ok = chunk_col < p.dim_v;
#pragma unroll(kUnroll)
  for (int i = 0; i < kCols / kRowStep; ++i) {
    const int n = load_row + i * kRowStep;
    const bool valid = col_valid(smem.col_offset[n], src.limit);
    const bool q_ok = valid && q_chunk_ok, d_ok = valid && dout_chunk_ok;
    const int dst = Cfg::col_chunk_index(n, chunk) * kVec;
    const ColOffsets at = valid ? col_offsets(p, smem, src, n) : ColOffsets{0, 0, 0};
    ptx::cp_async_16(ptx::smem_address(&smem.q[stage][dst]), src.q + (q_ok ? at.q + chunk_col : 0), q_ok ? 16 : 0);
    ptx::cp_async_16(ptx::smem_address(&smem.dout[stage][dst]), src.dout + (d_ok ? at.dout + chunk_col : 0),
                     d_ok ? 16 : 0);
  }
  load_lse_delta<kCols, kLoadThreads>(p, smem, src, stage, load_tid);
}

// Key row r of a neighborhood CTA (origin k_origin, one dilation group): its group
// indices j and token; false past the group's end.
__device__ __forceinline__ bool neighborhood_key_row(const BackwardParams& p, const int* group, const int* k_origin,
                                                     const int* lg, int r, int* j, int* token) {
  int off[kMaxRank];
  p.kv_shape.row_offset(r, off);
  bool valid = true;
  for (int a = 0; a < kMaxRank; ++a) {
    j[a] = k_origin[a] + off[a];
    valid &= j[a] < lg[a];
  }
  token_of(p.nb, group, j, token);
  return valid;
}

// Key row r's {j, inverse window begin, end, 0} per axis in smem.row_axis (an empty
// window past the group's end), what the element mask reads.
template <class Smem>
__device__ __forceinline__ void neighborhood_key_row_axis(const BackwardParams& p, Smem& smem, const int* group,
                                                          const int* k_origin, const int* lg, int r) {
  int j[kMaxRank], token[kMaxRank];
  const bool valid = neighborhood_key_row(p, group, k_origin, lg, r, j, token);
  for (int a = 0; a < kMaxRank; ++a) {
    const Range w = valid ? computed_queries(p, a, group[a], p.nb.axis[a].inverse_window(j[a], lg[a])) : Range{0, 0};
    smem.row_axis[r][a] = make_int4(j[a], w.begin, w.end, 0);
  }
}

// The queries a key-pass CTA walks: the inverse-window union of its keys (first
// `row(a)` from k_origin, clipped to the group length), of those the computed ones.
__device__ __forceinline__ Box key_tile_queries(const BackwardParams& p, const int* group, const int* k_origin,
                                                const int* lg) {
  Box qbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const int last = imin(k_origin[a] + p.kv_shape.row(a), lg[a]) - 1;
    qbox.r[a] = computed_queries(p, a, group[a], p.nb.axis[a].inverse_window_union({k_origin[a], last + 1}, lg[a]));
  }
  return qbox;
}

// Warp `warp`'s keys: whether it has none (past the grid) or some past the grid, and
// (lane 0) the union and intersection of its keys' inverse windows per axis,
// {union begin, union end, intersection begin, intersection end} (first and last
// valid key: inverse windows' begins and ends never decrease along an axis); empty
// for a warp with no key.
struct KeyWarp {
  bool idle, partial;
};
template <class Smem>
__device__ KeyWarp neighborhood_key_warp(const BackwardParams& p, Smem& smem, const int* group, const int* k_origin,
                                         const int* lg, int warp, int lane) {
  KeyWarp kw{false, false};
  int off[kMaxRank];
  p.kv_shape.warp_offset(warp, off);
  int4 box[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.nb.axis[a];
    const int first = k_origin[a] + off[a];
    const int last = imin(first + p.kv_shape.warp(a), lg[a]) - 1;
    kw.idle |= first > last;
    kw.partial |= first + p.kv_shape.warp(a) > lg[a];
    const Range wf = ax.inverse_window(imin(first, lg[a] - 1), lg[a]), wl = ax.inverse_window(imax(last, 0), lg[a]);
    const Range uni = computed_queries(p, a, group[a], {wf.begin, wl.end});
    const Range both = computed_queries(p, a, group[a], {wl.begin, wf.end});
    box[a] = make_int4(uni.begin, uni.end, both.begin, both.end);
  }
  if (lane == 0)
    for (int a = 0; a < kMaxRank; ++a) smem.warp_box[warp][a] = kw.idle ? make_int4(0, 0, 0, 0) : box[a];
  return kw;
}

// What one warp does with a query tile: bit j of `active` is set when 8-query chunk
// j holds queries the warp's keys may see; `needs_mask` when some pair of the tile
// is not attended (the tile is not inside every key's inverse window and inside the
// walk), or an RPB must be added. From a ballot: warp-uniform.
struct KeyWarpTile {
  uint32_t active;
  bool needs_mask;
};
template <int kColBlocks, class Smem>
__device__ __forceinline__ KeyWarpTile key_warp_tile(const GridTile& shape, const Smem& smem, int warp, int lane,
                                                     const QueryTile& qtile, const int* limit, bool additional,
                                                     const KeyWarp& kw, bool has_rpb) {
  KeyWarpTile t{0u, true};
  if (kw.idle) return t;
  // Chunk j holds queries 8j..8j+7 of the tile: fixed coordinates on axes 0 and 1
  // (the innermost tile extent is a multiple of 8), a run of 8 on axis 2.
  bool lane_active = false;
  if (lane < kColBlocks) {
    int off[kMaxRank];
    shape.col_offset(lane * 8, off);
    lane_active = true;
    for (int a = 0; a < kMaxRank; ++a) {
      const int lo = off[a], hi = lo + (a == kMaxRank - 1 ? 8 : 1);
      lane_active &= lo < limit[a];
      if (!additional) {
        const int4 box = smem.warp_box[warp][a];  // {union begin, union end, ...}
        lane_active &= qtile.origin[a] + lo < box.y && qtile.origin[a] + hi > box.x;
      }
    }
  }
  t.active = __ballot_sync(0xffffffffu, lane_active);
  // Inside every inverse window of the warp's keys, and inside the walk: no mask.
  t.needs_mask = has_rpb || kw.partial;
  for (int a = 0; a < kMaxRank; ++a) {
    t.needs_mask |= shape.col(a) > limit[a];
    if (!additional) {
      const int4 box = smem.warp_box[warp][a];  // {..., intersection begin, end}
      t.needs_mask |= qtile.origin[a] < box.z || qtile.origin[a] + shape.col(a) > box.w;
    }
  }
  return t;
}

// The scores of one warp's 16 keys x kBlocks 8-query chunks (chunks jb0.. of the
// tile), S^T = K Q^T in the accumulator layout, to base-2 units: scaled, and on
// tiles that need it masked (-inf: pairs not attended, chunks not active, rows
// past the keys) and biased. `row_axis` holds each key row's {j, inverse window
// begin, end} per axis (additional tokens: {m, 0, valid}).
template <class T, int kBlocks>
__device__ __forceinline__ void key_scores_to_base2(float (&s)[kBlocks][4], int jb0, uint32_t active, bool needs_mask,
                                                    bool additional, const BackwardParams& p, const int4 (*row_axis)[kMaxRank],
                                                    const int* my_row, const QueryTile& qtile, const int* limit, int h,
                                                    bool has_rpb, int t4) {
  const GridTile& shape = p.kv_shape;
  if (!needs_mask) {
#pragma unroll
    for (int j = 0; j < kBlocks; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= p.scale_log2;
  } else if (additional) {
    bool row_ok[2];
    for (int i = 0; i < 2; ++i) row_ok[i] = row_axis[my_row[i]][0].z != 0;
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      int off[kMaxRank];
      shape.col_offset(8 * (jb0 + j), off);  // the chunk's first query; the run is along axis 2
      const bool chunk_ok = ((active >> j) & 1u) && off[0] < limit[0] && off[1] < limit[1];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool keep = chunk_ok && row_ok[e >> 1] && off[2] + 2 * t4 + (e & 1) < limit[2];
        s[j][e] = keep ? s[j][e] * p.scale_log2 : kNegInf;
      }
    }
  } else {
    // Per key row and axis, the queries of this tile (offsets from its origin) that
    // see the key: its inverse window.
    int lo[2][kMaxRank], hi[2][kMaxRank];
    int64_t bias_base[2];
    for (int i = 0; i < 2; ++i) {
      bias_base[i] = int64_t(h) * p.rpb_layout.head;
      for (int a = 0; a < kMaxRank; ++a) {
        const int4 ra = row_axis[my_row[i]][a];  // {j, inverse begin, inverse end}
        lo[i][a] = ra.y - qtile.origin[a];
        hi[i][a] = ra.z - qtile.origin[a];
        bias_base[i] += int64_t(ra.x - qtile.origin[a] + p.nb.axis[a].kernel - 1) * p.rpb_layout.axis[a];
      }
    }
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      const bool chunk_on = (active >> j) & 1u;
      int off[kMaxRank];
      shape.col_offset(8 * (jb0 + j), off);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, off2 = off[2] + 2 * t4 + (e & 1);
        const bool keep = chunk_on && off[0] >= lo[i][0] && off[0] < hi[i][0] && off[1] >= lo[i][1] &&
                          off[1] < hi[i][1] && off2 >= lo[i][2] && off2 < hi[i][2];
        float x = kNegInf;
        if (keep) {
          x = s[j][e] * p.scale_log2;
          if (has_rpb) {
            // bias index = key - query + kernel - 1 per axis
            const int64_t ro = bias_base[i] - off[0] * p.rpb_layout.axis[0] - off[1] * p.rpb_layout.axis[1] -
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
}

// P^T = exp2(score - lse) in place: columns hold queries, so lse varies along e & 1.
// lse_delta4[i] = {lse, delta} of queries 2i and 2i + 1 of the tile.
template <int kBlocks>
__device__ __forceinline__ void key_probabilities(float (&s)[kBlocks][4], int jb0, const float4* lse_delta4, int t4) {
#pragma unroll
  for (int j = 0; j < kBlocks; ++j) {
    const float4 ld = lse_delta4[(8 * (jb0 + j) + 2 * t4) / 2];
    s[j][0] = ptx::exp2_approx(s[j][0] - ld.x);
    s[j][1] = ptx::exp2_approx(s[j][1] - ld.z);
    s[j][2] = ptx::exp2_approx(s[j][2] - ld.x);
    s[j][3] = ptx::exp2_approx(s[j][3] - ld.z);
  }
}

// dS^T = P^T (dP^T - delta) (masked entries: P^T = 0, so 0). `ds` may be `prob` or
// `dp`: each element is read before it is written.
template <int kBlocks>
__device__ __forceinline__ void key_score_gradients(float (&ds)[kBlocks][4], const float (&prob)[kBlocks][4],
                                                    const float (&dp)[kBlocks][4], int jb0, const float4* lse_delta4,
                                                    int t4) {
#pragma unroll
  for (int j = 0; j < kBlocks; ++j) {
    const float4 ld = lse_delta4[(8 * (jb0 + j) + 2 * t4) / 2];
    const float x0 = prob[j][0] * (dp[j][0] - ld.y), x1 = prob[j][1] * (dp[j][1] - ld.w);
    const float x2 = prob[j][2] * (dp[j][2] - ld.y), x3 = prob[j][3] * (dp[j][3] - ld.w);
    ds[j][0] = x0;
    ds[j][1] = x1;
    ds[j][2] = x2;
    ds[j][3] = x3;
  }
}

}  // namespace nbhd::cuda::fused::detail_bwd
