// SPDX-License-Identifier: Apache-2.0
// Tensors of tokens that hold one box of the grid, addressed by grid coordinates: the
// query side of a problem (query, out, lse, d_out, d_query) holds its query sub-box,
// the key side (key, value, d_key, d_value) the whole grid. Host code, for the CPU
// backends.
#pragma once

#include "core/layout.hpp"
#include "nbhd/problem.hpp"

namespace nbhd::cpu {

struct BoxLayout {
  detail::TokenLayout tensor;  // the tensor's own layout: its token 0 is the box's first
  Range box[kMaxRank];         // per padded axis, in grid coordinates
  int64_t inner = 0;

  bool holds(const int* token) const {
    return box[0].contains(token[0]) && box[1].contains(token[1]) && box[2].contains(token[2]);
  }
  // Offset of a token of the box (grid coordinates).
  int64_t offset(int64_t b, const int* token, int64_t h) const {
    const int local[kMaxRank] = {token[0] - box[0].begin, token[1] - box[1].begin, token[2] - box[2].begin};
    return tensor.offset(b, local, h);
  }
};

// query, out, lse (has_inner false), d_out, d_query of `p`.
inline BoxLayout query_layout(const TensorRef& t, const Problem& p, bool has_inner = true) {
  BoxLayout l;
  l.tensor = detail::token_layout(t, p.rank, has_inner);
  for (int a = 0; a < kMaxRank; ++a) l.box[a] = p.padded_query_range(a);
  l.inner = l.tensor.inner;
  return l;
}

// key, value, d_key, d_value of `p`.
inline BoxLayout key_layout(const TensorRef& t, const Problem& p) {
  BoxLayout l;
  l.tensor = detail::token_layout(t, p.rank);
  for (int a = 0; a < kMaxRank; ++a) l.box[a] = {0, p.padded_extent(a)};
  l.inner = l.tensor.inner;
  return l;
}

}  // namespace nbhd::cpu
