// SPDX-License-Identifier: Apache-2.0
// An independent statement of ../shared/spec/semantics.md for the tests: the
// neighbor relation written straight from the spec's text, by enumeration, sharing
// no code with include/nbhd/core/window.hpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace nbhd::testing {

struct SpecAxis {
  int L, k, d, s;
  bool causal;
};

// Keys (axis indices, ascending) the query at index i attends on this axis.
inline std::vector<int> spec_axis_neighbors(const SpecAxis& ax, int i) {
  const int g = i % ax.d;             // 1. dilation group
  const int j = i / ax.d;             //    index inside the group
  const int Lg = (ax.L - g + ax.d - 1) / ax.d;
  const int left = ax.k / 2;          // 2.
  int lo, hi;                         // window [lo, hi] inclusive, group indices
  if (!ax.causal) {                   // 3.
    const int p = std::min((j / ax.s) * ax.s + ax.s / 2, Lg - 1);
    const int start = std::clamp(p - left, 0, Lg - ax.k);
    lo = start;
    hi = start + ax.k - 1;
  } else {                            // 4.
    const int p = std::min((j / ax.s) * ax.s + ax.s - 1, Lg - 1);
    lo = std::max(p - ax.k + 1, 0);
    hi = j;
  }
  std::vector<int> keys;              // 5.
  for (int key = 0; key < ax.L; ++key)
    if (key % ax.d == g && key / ax.d >= lo && key / ax.d <= hi) keys.push_back(key);
  return keys;
}

inline bool spec_axis_is_neighbor(const SpecAxis& ax, int query, int key) {
  const std::vector<int> keys = spec_axis_neighbors(ax, query);
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

}  // namespace nbhd::testing
