// SPDX-License-Identifier: Apache-2.0
// Tile shapes of the tiled CUDA backends (fused, gemm): a query tile is a box of one
// dilation group's grid, cut into one 16-query box per warp; a key tile is a box of
// keys. Extents are powers of two per (padded) axis, so a row index splits into
// coordinates with shifts. Host and device.
#pragma once

#include <cstdint>
#include <string>

#include "nbhd/core/window.hpp"
#include "nbhd/status.hpp"

namespace nbhd::cuda {

// Element `n` of a box with extents 2^log2[a], row-major: its offset per axis.
NBHD_HOST_DEVICE constexpr void box_offset(int n, const int* log2, int* off) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    off[a] = n & ((1 << log2[a]) - 1);
    n >>= log2[a];
  }
}

struct TileShape {
  int q_log2[kMaxRank];  // query tile extent per axis, log2; product = 16 * warps
  int w_log2[kMaxRank];  // per-warp box, log2; product 16, divides the query tile
  int k_log2[kMaxRank];  // key tile, log2; product = keys per tile, innermost >= 8

  NBHD_HOST_DEVICE constexpr int q(int a) const { return 1 << q_log2[a]; }
  NBHD_HOST_DEVICE constexpr int w(int a) const { return 1 << w_log2[a]; }
  NBHD_HOST_DEVICE constexpr int k(int a) const { return 1 << k_log2[a]; }
  NBHD_HOST_DEVICE constexpr int queries() const { return 1 << (q_log2[0] + q_log2[1] + q_log2[2]); }
  NBHD_HOST_DEVICE constexpr int keys() const { return 1 << (k_log2[0] + k_log2[1] + k_log2[2]); }

  // Query row r of the tile (0 .. queries-1): warp r / 16 owns a w-box, rows inside
  // it are row-major. Writes the row's offset from the tile origin per axis.
  NBHD_HOST_DEVICE constexpr void query_offset(int r, int* off) const {
    int warp = r >> 4, i = r & 15;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int nw_log2 = q_log2[a] - w_log2[a];
      off[a] = ((warp & ((1 << nw_log2) - 1)) << w_log2[a]) + (i & ((1 << w_log2[a]) - 1));
      warp >>= nw_log2;
      i >>= w_log2[a];
    }
  }

  // Origin of warp `warp`'s box relative to the query tile origin.
  NBHD_HOST_DEVICE constexpr void warp_offset(int warp, int* off) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int nw_log2 = q_log2[a] - w_log2[a];
      off[a] = (warp & ((1 << nw_log2) - 1)) << w_log2[a];
      warp >>= nw_log2;
    }
  }

  // Key n of a key tile, row-major over the tile box.
  NBHD_HOST_DEVICE constexpr void key_offset(int n, int* off) const { box_offset(n, k_log2, off); }
};

// Tokens of a tile of one dilation group. The tiled kernels keep query and key boxes
// unwrapped on a periodic axis (window.hpp), so a tile at the seam reaches past
// either end of its group and its rows' indices wrap.

// The token of group indices j (unwrapped on a periodic axis), the groups' lengths
// given (lg[a] = group_length(group[a])): a loop over a tile's rows takes them once,
// not an integer division per row and axis.
NBHD_HOST_DEVICE void token_of(const Neighborhood& nb, const int* group, const int* lg, const int* j, int* token) {
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    token[a] = group[a] + ax.dilation * (ax.periodic ? ax.wrap(j[a], lg[a]) : j[a]);
  }
}

// The same, the groups' lengths computed (per call).
NBHD_HOST_DEVICE void token_of(const Neighborhood& nb, const int* group, const int* j, int* token) {
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    token[a] = group[a] + ax.dilation * (ax.periodic ? ax.wrap(j[a], ax.group_length(group[a])) : j[a]);
  }
}

// Whether a tile of `extent[a]` group indices from `origin` reaches past either end of
// a periodic axis's group: its rows' tokens then wrap one by one, and the tables of
// offsets from the tile origin (linear in the indices) do not apply.
NBHD_HOST_DEVICE bool tile_wraps(const Neighborhood& nb, const int* group, const int* origin, const int* extent) {
  bool wraps = false;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    wraps |= ax.periodic && (origin[a] < 0 || origin[a] + extent[a] > ax.group_length(group[a]));
  }
  return wraps;
}

// The token of the tile row or column at packed offsets (axis a in bits 10a..) from
// `origin` (with lg: the groups' lengths, as token_of).
NBHD_HOST_DEVICE void packed_token(const Neighborhood& nb, const int* group, const int* lg, const int* origin, int packed,
                                   int* token) {
  const int j[kMaxRank] = {origin[0] + (packed & 1023), origin[1] + ((packed >> 10) & 1023), origin[2] + (packed >> 20)};
  token_of(nb, group, lg, j, token);
}
NBHD_HOST_DEVICE void packed_token(const Neighborhood& nb, const int* group, const int* origin, int packed, int* token) {
  const int j[kMaxRank] = {origin[0] + (packed & 1023), origin[1] + ((packed >> 10) & 1023), origin[2] + (packed >> 20)};
  token_of(nb, group, j, token);
}

// The indices [begin, end) of dilation group g's tokens (token = g + dilation * index)
// among the tokens [first, last) of an axis: a query sub-box's part of the group.
NBHD_HOST_DEVICE constexpr Range group_indices(int first, int last, int g, int dilation) {
  return {(first - g + dilation - 1) / dilation, (last - g + dilation - 1) / dilation};  // ceil; first - g > -dilation
}

// A shape from its log2 extents: query tile, warp box, key tile.
constexpr TileShape log2_shape(int q0, int q1, int q2, int w0, int w1, int w2, int k0, int k1, int k2) {
  return TileShape{{q0, q1, q2}, {w0, w1, w2}, {k0, k1, k2}};
}

// The tiles of boxes of 2^log2[a] group indices that cover every dilation group: per
// axis ceil(group 0's length / box) (group 0 is the longest) times the groups. A
// tiled kernel's grid is `count` times heads (or kv heads) times batch. With
// `extent` (a query sub-box's tokens per axis), the tiles cover the box instead: a
// group holds at most ceil(extent / dilation) of its tokens.
struct TileGrid {
  int per_group[kMaxRank];
  int64_t count;
};

inline TileGrid tile_grid(const Neighborhood& nb, const int* log2, const int* extent = nullptr) {
  TileGrid g{{}, 1};
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int box = 1 << log2[a];
    const int longest = extent ? (extent[a] + ax.dilation - 1) / ax.dilation : ax.group_length(0);
    g.per_group[a] = (longest + box - 1) / box;
    g.count *= int64_t(g.per_group[a]) * ax.dilation;
  }
  return g;
}

// CUDA launches at most 2^31 - 1 blocks along x (65535 along y and z). Backends check
// their grids where they decide whether they run a problem (supports), so that auto
// passes it to another backend and the message gives the sizes, instead of a launch
// failing with cudaErrorInvalidConfiguration.
inline constexpr int64_t kMaxGridX = 0x7fffffff;
inline constexpr int64_t kMaxGridYZ = 65535;

inline Status check_grid(const std::string& kernel, int64_t blocks, int64_t blocks_y = 1) {
  if (blocks <= kMaxGridX && blocks_y <= kMaxGridYZ) return Status::Ok();
  return unsupported(kernel + " needs a grid of " + std::to_string(blocks) + " x " + std::to_string(blocks_y) +
                     " thread blocks; CUDA launches at most 2^31 - 1 x 65535 (fewer batches, heads or tokens per "
                     "call, or backend naive, whose kernels loop over any size)");
}

}  // namespace nbhd::cuda
