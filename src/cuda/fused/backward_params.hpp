// SPDX-License-Identifier: Apache-2.0
// Arguments of the fused backward kernels, computed once on the host, and the tile
// geometry that the kernels, the host and the planner's tests share.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "core/layout.hpp"
#include "cuda/common/tile_shape.hpp"
#include "cuda/common/tma_view.hpp"

namespace nbhd::cuda::fused {

// A backward CTA's tiling in mma terms: its own rows (the M dimension; 16 per warp,
// each warp's rows a box) and the column tiles it walks (the N dimension). The key
// pass's rows are keys and its columns queries; the dq pass has the forward's
// orientation. Both take a table entry as is: rows = its query tile and warp boxes,
// columns = its key tile (the neighborhood is symmetric enough that a good key-box
// tiling for queries is a good query-box tiling for keys; backward_plan.cpp counts).
struct GridTile {
  int row_log2[kMaxRank];   // the CTA's tile, log2 per axis; product = 16 * warps
  int warp_log2[kMaxRank];  // one warp's box, log2; product 16
  int col_log2[kMaxRank];   // a column tile, log2; innermost >= 8 (8-column chunks are runs)

  static constexpr GridTile from(const TileShape& s) {
    return {{s.q_log2[0], s.q_log2[1], s.q_log2[2]},
            {s.w_log2[0], s.w_log2[1], s.w_log2[2]},
            {s.k_log2[0], s.k_log2[1], s.k_log2[2]}};
  }

  // Its rows as a TileShape (the halo kernels' parts take one; no column tiles).
  NBHD_HOST_DEVICE constexpr TileShape row_shape() const {
    return {{row_log2[0], row_log2[1], row_log2[2]}, {warp_log2[0], warp_log2[1], warp_log2[2]}, {0, 0, 0}};
  }

  NBHD_HOST_DEVICE constexpr int row(int a) const { return 1 << row_log2[a]; }
  NBHD_HOST_DEVICE constexpr int warp(int a) const { return 1 << warp_log2[a]; }
  NBHD_HOST_DEVICE constexpr int col(int a) const { return 1 << col_log2[a]; }
  NBHD_HOST_DEVICE constexpr int rows() const { return 1 << (row_log2[0] + row_log2[1] + row_log2[2]); }
  NBHD_HOST_DEVICE constexpr int cols() const { return 1 << (col_log2[0] + col_log2[1] + col_log2[2]); }

  // Row r of the CTA tile: warp r / 16 owns a warp box, rows inside it row-major.
  NBHD_HOST_DEVICE constexpr void row_offset(int r, int* off) const {
    int w = r >> 4, i = r & 15;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int nw_log2 = row_log2[a] - warp_log2[a];
      off[a] = ((w & ((1 << nw_log2) - 1)) << warp_log2[a]) + (i & ((1 << warp_log2[a]) - 1));
      w >>= nw_log2;
      i >>= warp_log2[a];
    }
  }

  // Inverse of row_offset: the row holding offset `off` of the CTA tile.
  NBHD_HOST_DEVICE constexpr int row_of(const int* off) const {
    int w = 0, i = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      w = (w << (row_log2[a] - warp_log2[a])) | (off[a] >> warp_log2[a]);
      i = (i << warp_log2[a]) | (off[a] & ((1 << warp_log2[a]) - 1));
    }
    return (w << 4) | i;
  }

  // Origin of warp `w`'s box relative to the CTA tile origin.
  NBHD_HOST_DEVICE constexpr void warp_offset(int w, int* off) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int nw_log2 = row_log2[a] - warp_log2[a];
      off[a] = (w & ((1 << nw_log2) - 1)) << warp_log2[a];
      w >>= nw_log2;
    }
  }

  // Column n of a column tile, row-major over the tile box.
  NBHD_HOST_DEVICE constexpr void col_offset(int n, int* off) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      off[a] = n & ((1 << col_log2[a]) - 1);
      n >>= col_log2[a];
    }
  }
};

// The wgmma key pass's d rpb bins (backward_wgmma_kernel.cuh): warpgroup wg's keys,
// rows 64 wg .. 64 wg + 63 of the CTA tile (a box: the tile's halves along its
// outermost split axis), against a query tile. A key at offset r from the CTA tile
// origin and a query at offset c from the tile's sit in bin r - first + col - 1 - c
// per axis, in [0, extent); row-major, so the bin index is row_part(r) -
// col_part(c). The bias index is then bin + first - (col - 1) + key origin - query
// origin + kernel - 1 per axis.
struct RpbBins {
  // Bins per warpgroup in the kernel's shared memory: at most 330 over the table's
  // entries (FusedBackwardPlan.WgmmaRpbBinsFit); 3 KB for both warpgroups, in the
  // 5 KB that head dim 128 leaves below the 227 KB limit.
  static constexpr int kCapacity = 384;

  int first[kMaxRank];   // the warpgroup's first key, offset from the CTA tile origin
  int extent[kMaxRank];  // its key box extent + the column tile's - 1

  NBHD_HOST_DEVICE static constexpr RpbBins of(const GridTile& s, int wg) {
    RpbBins b{};
    int last[kMaxRank] = {};
    s.row_offset(64 * wg, b.first);
    s.row_offset(64 * wg + 63, last);
    for (int a = 0; a < kMaxRank; ++a) b.extent[a] = last[a] - b.first[a] + s.col(a);
    return b;
  }
  NBHD_HOST_DEVICE constexpr int count() const { return extent[0] * extent[1] * extent[2]; }
  NBHD_HOST_DEVICE constexpr int linear(int x0, int x1, int x2) const { return (x0 * extent[1] + x1) * extent[2] + x2; }
  NBHD_HOST_DEVICE constexpr int row_part(const GridTile& s, const int* r) const {
    return linear(r[0] - first[0] + s.col(0) - 1, r[1] - first[1] + s.col(1) - 1, r[2] - first[2] + s.col(2) - 1);
  }
  NBHD_HOST_DEVICE constexpr int col_part(const int* c) const { return linear(c[0], c[1], c[2]); }
};

// One axis of a key-pass CTA whose key tile starts at group index `origin` (extent
// `extent`, clipped to the group length lg): the relative-position-bias indices its
// (key, query) pairs can use, [begin, end) within [0, 2 * kernel - 1). The queries
// are the inverse-window union of its keys; the index is key - query + kernel - 1.
NBHD_HOST_DEVICE constexpr Range key_tile_rpb_span(const Axis& ax, int lg, int origin, int extent) {
  const int last = imin(origin + extent, lg) - 1;
  const Range q = ax.inverse_window_union({origin, last + 1}, lg);
  return {imax(0, origin - (q.end - 1) + ax.kernel - 1), imin(2 * ax.kernel - 1, last - q.begin + ax.kernel)};
}

// The key pass's walk over query tiles: every query head of the GQA group; per head,
// per axis, the tiles of the query box (a neighborhood CTA: one dilation group) or of
// every dilation group's part of the axis's computed queries (an additional-token
// CTA: the problem's query sub-box, else the axis). Tile `it` is decoded from its
// index (a few divisions per tile) rather than carried from tile to tile: two walk
// states (the loads run a tile ahead) cost ~14 registers across the main loop.
struct WalkAxis {
  int begin, end;  // group >= 0: the query box's group indices; -1: the computed tokens
  int tiles;       // tiles along the axis
  int group;       // the CTA's dilation group, or -1: every group
};

// Every dilation group's part of the tokens [first, last) of an axis: the groups
// (first + k) % dilation for k < n_long hold `longest` of them, the others one less.
struct GroupsOfTokens {
  int longest, n_long;
};
NBHD_HOST_DEVICE constexpr GroupsOfTokens groups_of_tokens(const Axis& ax, int first, int last) {
  const int longest = ceil_div(last - first, ax.dilation);
  return {longest, last - first - (longest - 1) * ax.dilation};
}

// Tiles of extent `col` along an axis when every dilation group's part of the tokens
// [first, last) is walked.
NBHD_HOST_DEVICE constexpr int all_groups_tiles(const Axis& ax, int col, int first, int last) {
  const GroupsOfTokens gt = groups_of_tokens(ax, first, last);
  return gt.n_long * ceil_div(gt.longest, col) + (ax.dilation - gt.n_long) * ceil_div(gt.longest - 1, col);
}

struct QueryTile {
  int head;  // within the GQA group
  int group[kMaxRank];
  int origin[kMaxRank];
  int end[kMaxRank];  // of the walk on each axis: the query box's end or the group length
};

// kEveryGroup = false: a walk of one group's box only (the wgmma key pass, whose
// CTAs are all neighborhood ones), without the every-group decode's registers.
template <bool kEveryGroup = true>
NBHD_HOST_DEVICE constexpr QueryTile query_tile(const Neighborhood& nb, const GridTile& shape, const WalkAxis* walk,
                                                int it) {
  QueryTile t{};
  const int tiles = walk[0].tiles * walk[1].tiles * walk[2].tiles;
  t.head = it / tiles;
  int rest = it - t.head * tiles;
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const WalkAxis w = walk[a];
    const int ta = rest % w.tiles;
    rest /= w.tiles;
    if (!kEveryGroup || w.group >= 0) {
      t.group[a] = w.group;
      t.origin[a] = w.begin + ta * shape.col(a);
      t.end[a] = w.end;
      continue;
    }
    // The k-th group from the first token's, k < n_long, has the longest part, the
    // others one less (none when n_long == dilation); ceil(part / col) tiles each.
    const Axis& ax = nb.axis[a];
    const GroupsOfTokens gt = groups_of_tokens(ax, w.begin, w.end);
    const int c_long = ceil_div(gt.longest, shape.col(a));
    int k = 0, i = 0;
    if (ta < gt.n_long * c_long) {
      k = ta / c_long;
      i = ta - k * c_long;
    } else {
      const int c_short = ceil_div(gt.longest - 1, shape.col(a)), u = ta - gt.n_long * c_long;
      k = gt.n_long + u / c_short;
      i = u - (k - gt.n_long) * c_short;
    }
    const int g = (w.begin + k) % ax.dilation;
    const Range part = group_indices(w.begin, w.end, g, ax.dilation);
    t.group[a] = g;
    t.origin[a] = part.begin + i * shape.col(a);
    t.end[a] = part.end;
  }
  return t;
}

struct BackwardParams {
  // Inputs.
  const void* q;
  const void* k;
  const void* v;
  const void* additional_k;
  const void* additional_v;
  const void* rpb;  // null when absent
  const void* out;
  const void* d_out;
  const float* lse;
  const float* d_lse;  // null, or lse's gradient: delta becomes rowsum(dO * out) - d_lse
  bool rpb_is_float32;
  // Outputs (d_rpb null when not requested).
  void* d_q;
  void* d_k;
  void* d_v;
  void* d_additional_k;
  void* d_additional_v;
  float* d_rpb;
  detail::TokenLayout q_layout, k_layout, v_layout, ak_layout, av_layout, out_layout, dout_layout, lse_layout,
      d_lse_layout;
  detail::TokenLayout dq_layout, dk_layout, dv_layout, dak_layout, dav_layout;
  detail::RpbLayout rpb_layout, drpb_layout;

  // Workspace.
  float* lse_delta;    // [B, H, tokens, 2]: {lse * log2(e), rowsum(dO * out) - d_lse} (float2 on the device)
  float* dq_accum;     // [B, tokens, H, dim] float32 sums of dS K by atomics; null in deterministic mode
  float* rpb_partial;  // deterministic d rpb: per key-pass CTA and query head, its span of bias indices
  int rpb_span[kMaxRank];  // span extent per axis (max over key-pass CTAs of key_tile_rpb_span)

  Neighborhood nb;
  // The queries computed: tokens [query_begin, query_end) per axis (the problem's
  // query sub-box, else the grid). q, out, d_out, lse, d_lse and d_q hold the box's
  // tokens only, their pointers moved back by the box origin's offset so that grid
  // tokens index them (host.hpp, box_base); the workspaces hold its rows, row-major
  // over the box (flat_token).
  int query_begin[kMaxRank], query_end[kMaxRank];
  int64_t tokens;  // per batch and head: the query tokens (the box's)
  int batch, heads, kv_heads, heads_per_kv;
  int dim, dim_v;
  int additional_tokens;
  float scale;       // softmax scale
  float scale_log2;  // softmax scale * log2(e): scores in base-2 units

  // Key pass: CTAs per (batch, kv head) are additional_ctas (64 additional tokens
  // each, first in the grid: they walk every query) then kv_tiles key tiles. With
  // wgmma_key_pass the key tiles run on the wgmma kernel (128 keys, sm_90a) and the
  // additional tokens' CTAs on the mma.sync one.
  bool wgmma_key_pass;
  // The wgmma key pass's producer copies each query tile's Q and dO by TMA (a box of
  // the token grid per 64-column slab; backward_plan.hpp, key_pass_tma_views), else
  // by the warpgroup's cp.async. lse and delta are cp.async's either way.
  bool key_pass_tma;
  CUtensorMap q_map, dout_map;
  TmaView q_view, dout_view;
  GridTile kv_shape;
  int kv_tiles_per_group[kMaxRank];
  int64_t kv_tiles;
  int additional_ctas;
  int additional_col_tiles;  // query tiles per head an additional-token CTA walks

  // Dq pass (deterministic mode): query tiles per (batch, head), as the forward.
  GridTile dq_shape;
  int dq_tiles_per_group[kMaxRank];
  int64_t dq_tiles;
  // The halo dq pass (backward_halo_kernel.cuh) when > 0: its key rows in shared
  // memory (halo_rows_bound); 0: the tiled dq pass.
  int dq_halo_rows;
  // The halo key pass when > 0: its query rows in shared memory (halo_key_rows_bound;
  // kv_shape is then its key tile); 0: the tiled or wgmma key pass.
  int kv_halo_rows;
};

}  // namespace nbhd::cuda::fused
