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

  // Every rule of the spec on parameters; the message names argument, axis, value, bound.
  Status validate() const;

  int64_t value_dim() const { return dim_v > 0 ? dim_v : dim; }
  double softmax_scale() const;
  int64_t tokens() const;                // product of the extents
  int64_t window_size() const;           // product of the kernel sizes
  int64_t rpb_size() const;              // product of (2k - 1)
  int64_t heads_per_kv() const { return heads / kv_heads; }
  bool any_periodic() const { return periodic[0] || periodic[1] || periodic[2]; }

  // The axes padded to 3 (leading axes of length 1), for the backends.
  Neighborhood neighborhood() const;
  // Spatial extent of padded axis a (0..2).
  int padded_extent(int a) const;

  // Pairs (query token, key token) the neighborhood attends, summed over the grid
  // (without additional tokens). Exact, O(sum of extents).
  int64_t attended_pairs() const;
  // Forward FLOPs as the spec counts them: 4 * B * H * pairs * D (2 * (D + Dv) in
  // general), additional tokens included.
  double forward_flops() const;
  // Bytes the forward must move at least: inputs once, outputs once.
  double forward_bytes() const;

  std::string to_string() const;
};

}  // namespace nbhd
