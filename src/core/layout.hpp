// SPDX-License-Identifier: Apache-2.0
// Element offsets of the heads-last tensors, with the spatial axes padded to 3 like
// Neighborhood (a padded axis has stride 0). Host and device.
#pragma once

#include <cstdint>

#include "nbhd/core/window.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd::detail {

// [B, X..., H, D]-shaped tensor (also lse [B, X..., H] with inner = 0, additional
// tokens [B, M, Hkv, D] as rank 1, attention weights [B, X..., H, W + M]).
struct TokenLayout {
  int64_t batch = 0;
  int64_t axis[kMaxRank] = {};
  int64_t head = 0;
  int64_t inner = 0;

  NBHD_HOST_DEVICE int64_t offset(int64_t b, const int* token, int64_t h) const {
    return b * batch + token[0] * axis[0] + token[1] * axis[1] + token[2] * axis[2] + h * head;
  }
};

// `t` holds 1 batch dim, `rank` spatial dims, then heads, then (unless has_inner is
// false) the feature dim.
inline TokenLayout token_layout(const TensorRef& t, int rank, bool has_inner = true) {
  TokenLayout l;
  if (!t.defined()) return l;
  l.batch = t.stride[0];
  for (int a = 0; a < rank; ++a) l.axis[kMaxRank - rank + a] = t.stride[1 + a];
  l.head = t.stride[1 + rank];
  l.inner = has_inner ? t.stride[2 + rank] : 0;
  return l;
}

// rpb [H, 2k-1, ...]: offset of head h at per-axis bias indices idx (padded to 3).
struct RpbLayout {
  int64_t head = 0;
  int64_t axis[kMaxRank] = {};

  NBHD_HOST_DEVICE int64_t offset(int64_t h, const int* idx) const {
    return h * head + idx[0] * axis[0] + idx[1] * axis[1] + idx[2] * axis[2];
  }
};

inline RpbLayout rpb_layout(const TensorRef& t, int rank) {
  RpbLayout l;
  if (!t.defined()) return l;
  l.head = t.stride[0];
  for (int a = 0; a < rank; ++a) l.axis[kMaxRank - rank + a] = t.stride[1 + a];
  return l;
}

}  // namespace nbhd::detail
