// SPDX-License-Identifier: Apache-2.0
// Index geometry of the gemm kernels, host and device (the CPU tests replay every
// kernel's scatter and gather with it): which tile a CTA owns, a query row's windows
// and its part of a slab, the key box of a slab and its key tiles, and whether an
// 8-key chunk of a key tile can hold a neighbor of a warp's queries.
#pragma once

#include "cuda/gemm/tile.hpp"

namespace nbhd::cuda::gemm {

// [lo, lo + size): membership with one unsigned compare (size 0 holds nothing).
struct Span {
  int lo, size;
};
NBHD_HOST_DEVICE bool in(int x, Span s) { return unsigned(x - s.lo) < unsigned(s.size); }
NBHD_HOST_DEVICE Span span(int lo, int hi) { return {lo, imax(hi - lo, 0)}; }

// Per axis [begin, end) ranges of group indices.
struct Box {
  Range r[kMaxRank];
  NBHD_HOST_DEVICE bool empty() const { return r[0].size() <= 0 || r[1].size() <= 0 || r[2].size() <= 0; }
};

// The token of group indices j of a dilation group: the shared definition of the
// tiled backends (cuda/common/tile_shape.hpp), which wraps an unwrapped index on a
// periodic axis. Key boxes, key tiles and IN's query boxes are unwrapped there (they
// may begin below 0 or end past the group length); query tiles of PN / NN and key
// tiles of IN start inside the group and never wrap.
using nbhd::cuda::token_of;

// A tile of one dilation group: the group and its length per axis, and the origin
// (group indices) of the tile.
struct GroupTile {
  int group[kMaxRank], lg[kMaxRank], origin[kMaxRank];
};

// Tile `tile` of a grid cut into tiles of 2^log2[a] per axis, `tiles_per_group[a]`
// per dilation group. False when the tile lies past its (shorter) group's end.
NBHD_HOST_DEVICE bool decode_group_tile(const Neighborhood& nb, const int* tiles_per_group, const int* log2,
                                        int64_t tile, GroupTile& t) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    const int per_axis = tiles_per_group[a] * nb.axis[a].dilation;
    const int ta = int(tile % per_axis);
    tile /= per_axis;
    t.group[a] = ta / tiles_per_group[a];
    t.origin[a] = (ta % tiles_per_group[a]) << log2[a];
    t.lg[a] = nb.axis[a].group_length(t.group[a]);
  }
  for (int a = 0; a < kMaxRank; ++a)
    if (t.origin[a] >= t.lg[a]) return false;
  return true;
}

// The windows of the first and last valid query of a box (per axis: window begins
// and ends never decrease along an axis, so the union over the box of any
// per-query interval [b + lo, min(e, b + hi)) runs from the first's to the last's).
struct Extremes {
  Range first[kMaxRank], last[kMaxRank];
  bool empty;
};

NBHD_HOST_DEVICE Extremes extremes(const Neighborhood& nb, const int* lg, const int* first, const int* extent) {
  Extremes e{};
  e.empty = false;
  for (int a = 0; a < kMaxRank; ++a) {
    const int last = imin(first[a] + extent[a], lg[a]) - 1;
    if (last < first[a]) {
      e.empty = true;
      continue;
    }
    e.first[a] = nb.axis[a].window(first[a], lg[a]);
    e.last[a] = nb.axis[a].window(last, lg[a]);
  }
  return e;
}

// Keys (group indices) a box of queries sees through a slab's kernel offsets.
NBHD_HOST_DEVICE Box slab_box(const Extremes& e, const Slab& s) {
  Box box{};
  if (e.empty || !s.window) return box;  // all empty
  for (int a = 0; a < kMaxRank; ++a)
    box.r[a] = {e.first[a].begin + s.offset[a].begin, imin(e.last[a].end, e.last[a].begin + s.offset[a].end)};
  return box;
}

// One query row of a PN / NN tile, as the thread owning it in the mma C layout sees it.
struct QueryRow {
  int j[kMaxRank];
  Range window[kMaxRank];
  bool valid;
  int base;  // sum over axes of window begin * slot stride: slot = key code - base
};

NBHD_HOST_DEVICE QueryRow query_row(const Neighborhood& nb, const TileShape& shape, const GroupTile& t, int r) {
  QueryRow q{};
  int off[kMaxRank];
  shape.query_offset(r, off);
  q.valid = true;
  for (int a = 0; a < kMaxRank; ++a) {
    q.j[a] = t.origin[a] + off[a];
    q.valid &= q.j[a] < t.lg[a];
  }
  q.base = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    q.window[a] = q.valid ? nb.axis[a].window(q.j[a], t.lg[a]) : Range{0, 0};
    q.base += q.window[a].begin * slot_stride(nb, a);
  }
  return q;
}

// A row's part of a slab: per axis the keys it sees through the slab's offsets, and
// `base` with (key code - base) = the key's column in the slab tile (row included).
struct RowSlab {
  Span key[kMaxRank];
  int base;        // window slots: key code - base
  int extra_base;  // additional token m: extra_base + m
  bool valid;
};

NBHD_HOST_DEVICE RowSlab row_slab(const QueryRow& q, const Slab& s, int s_base, int row, int cols, int W) {
  RowSlab rs{};
  rs.valid = q.valid;
  for (int a = 0; a < kMaxRank; ++a)
    rs.key[a] = q.valid && s.window ? span(q.window[a].begin + s.offset[a].begin,
                                           imin(q.window[a].end, q.window[a].begin + s.offset[a].end))
                                    : Span{0, 0};
  rs.base = q.base + s_base - row * cols;
  rs.extra_base = row * cols + W - s_base;
  return rs;
}

// Key code of a key (group indices per axis): sum of index * slot stride.
NBHD_HOST_DEVICE int key_code(const Neighborhood& nb, const int* k) {
  return k[0] * slot_stride(nb, 0) + k[1] * slot_stride(nb, 1) + k[2];
}

// IN: a query row of the query box of a key tile (origin `kt.origin`), at group
// indices j (unwrapped on a periodic axis: Axis::inverse_window_union's box may begin
// below 0 or end past the group length). Per axis, the keys of its window as offsets
// from the key tile's origin, and `base` with (key code - base) = the key's slot in
// the row of the query j stands for. On a periodic axis that query is wrap(j); its
// window (unwrapped around it) is moved by j - wrap(j) next to the key tile, which
// keeps both the keys it holds and their slots (offsets from the window's begin).
// At most one image of a query holds a given key: a window is k <= lg consecutive
// positions.
struct InverseRow {
  Span keys[kMaxRank];
  int base;
};

NBHD_HOST_DEVICE InverseRow inverse_row(const Neighborhood& nb, const GroupTile& kt, const int* j, bool valid) {
  InverseRow r{};
  r.base = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int jq = ax.wrap(j[a], kt.lg[a]);  // j itself on a non-periodic axis
    const Range w = valid ? ax.window(jq, kt.lg[a]) : Range{0, 0};
    const int begin = w.begin + (j[a] - jq), end = w.end + (j[a] - jq);
    r.keys[a] = span(begin - kt.origin[a], end - kt.origin[a]);
    r.base += begin * slot_stride(nb, a);
  }
  return r;
}

// Key tiles of a box: per-axis counts and the origin of tile i (row-major).
struct KeyTiles {
  int count[kMaxRank];
  int total;
};
NBHD_HOST_DEVICE KeyTiles key_tiles(const Box& box, const TileShape& shape) {
  KeyTiles kt{};
  kt.total = box.empty() ? 0 : 1;
  for (int a = 0; a < kMaxRank; ++a) {
    kt.count[a] = box.empty() ? 0 : ceil_div(box.r[a].size(), shape.k(a));
    kt.total *= kt.count[a];
  }
  return kt;
}
NBHD_HOST_DEVICE void key_tile_origin(const KeyTiles& kt, const Box& box, const TileShape& shape, int i, int* origin) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    origin[a] = box.r[a].begin + (i % kt.count[a]) * shape.k(a);
    i /= kt.count[a];
  }
}

// Whether chunk `chunk` (keys 8 * chunk .. + 7 of the key tile at `origin`, a run
// along the innermost axis) has a key inside `box`.
NBHD_HOST_DEVICE bool chunk_active(const TileShape& shape, const int* origin, const Box& box, int chunk) {
  int off[kMaxRank];
  shape.key_offset(chunk * kChunkKeys, off);
  bool on = true;
  for (int a = 0; a < kMaxRank; ++a) {
    const int lo = origin[a] + off[a], hi = lo + (a == kMaxRank - 1 ? kChunkKeys : 1);
    on = on && lo < box.r[a].end && hi > box.r[a].begin;
  }
  return on;
}

}  // namespace nbhd::cuda::gemm
