// SPDX-License-Identifier: Apache-2.0
// Problem: everything that defines one neighborhood attention call except the data.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "nbhd/core/window.hpp"
#include "nbhd/dtype.hpp"
#include "nbhd/status.hpp"

namespace nbhd {

struct Problem {
  int rank = 2;                          // 1, 2 or 3 spatial axes
  std::array<int64_t, 3> extent{};       // token grid, first `rank` entries used
  std::array<int64_t, 3> kernel{};       // window size per axis
  std::array<int64_t, 3> dilation{1, 1, 1};
  std::array<int64_t, 3> stride{1, 1, 1};
  std::array<bool, 3> causal{};
  std::array<bool, 3> periodic{};        // wrap-around axes (never causal)
  int64_t batch = 1;
  int64_t heads = 1;
  int64_t kv_heads = 1;                  // heads % kv_heads == 0 (GQA/MQA)
  int64_t dim = 0;                       // head dim of q and k
  int64_t dim_v = 0;                     // head dim of v and out (0: same as dim)
  DType dtype = DType::kFloat32;
  std::optional<double> scale;           // default 1 / sqrt(dim)
  int64_t additional_tokens = 0;         // extra keys/values every query attends to
  bool has_rpb = false;                  // relative positional bias [H, 2k-1, ...]
  // Query sub-box: only the queries with query_begin[a] <= index < query_end[a] on
  // every axis are computed (query_end[a] == 0: up to the extent; the default is the
  // whole grid). Windows are the whole grid's, so the result is the whole call's
  // restricted to the box. query, out, lse, d_out and d_query hold the box's tokens
  // ([B, box..., H, D]); key, value, d_key and d_value the whole grid's. Used to
  // compute one shard's queries against a halo of keys (docs/distributed.md).
  std::array<int64_t, 3> query_begin{};
  std::array<int64_t, 3> query_end{};

  // Every rule of the spec on parameters; the message names argument, axis, value, bound.
  Status validate() const;

  int64_t value_dim() const { return dim_v > 0 ? dim_v : dim; }
  double softmax_scale() const;
  int64_t tokens() const;                // product of the extents (the key grid)
  int64_t query_tokens() const;          // product of the query sub-box's extents
  // Whether the query sub-box is smaller than the grid (backends that compute every
  // query of the grid refuse such a problem).
  bool has_query_box() const;
  int64_t window_size() const;           // product of the kernel sizes
  int64_t rpb_size() const;              // product of (2k - 1)
  int64_t heads_per_kv() const { return heads / kv_heads; }
  bool any_periodic() const { return periodic[0] || periodic[1] || periodic[2]; }

  // The axes padded to 3 (leading axes of length 1), for the backends.
  Neighborhood neighborhood() const;
  // Spatial extent of padded axis a (0..2).
  int padded_extent(int a) const;
  // The query sub-box on padded axis a (0..2), end resolved: [0, 1) on a padded axis.
  Range padded_query_range(int a) const;

  // Pairs (query token, key token) the neighborhood attends, summed over the query
  // sub-box (without additional tokens). Exact, O(sum of extents).
  int64_t attended_pairs() const;
  // Forward FLOPs as the spec counts them: 4 * B * H * pairs * D (2 * (D + Dv) in
  // general), additional tokens included.
  double forward_flops() const;
  // Bytes the forward must move at least: inputs once, outputs once.
  double forward_bytes() const;

  std::string to_string() const;
};

}  // namespace nbhd
