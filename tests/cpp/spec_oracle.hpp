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
  bool periodic = false;
};

// Window entries (unwrapped group indices, in window order) of the query at index i:
// steps 1-4 of the spec, and 3' on a periodic axis.
inline std::vector<int> spec_axis_window(const SpecAxis& ax, int i) {
  const int g = i % ax.d;             // 1. dilation group
  const int j = i / ax.d;             //    index inside the group
  const int Lg = (ax.L - g + ax.d - 1) / ax.d;
  const int left = ax.k / 2;          // 2.
  std::vector<int> entries;
  if (ax.periodic) {                  // 3'. centered on the leader, never shifted
    const int p = std::min((j / ax.s) * ax.s + ax.s / 2, Lg - 1);
    for (int w = p - left; w < p - left + ax.k; ++w) entries.push_back(w);
  } else if (!ax.causal) {            // 3.
    const int p = std::min((j / ax.s) * ax.s + ax.s / 2, Lg - 1);
    const int start = std::clamp(p - left, 0, Lg - ax.k);
    for (int w = start; w < start + ax.k; ++w) entries.push_back(w);
  } else {                            // 4.
    const int p = std::min((j / ax.s) * ax.s + ax.s - 1, Lg - 1);
    for (int w = std::max(p - ax.k + 1, 0); w <= j; ++w) entries.push_back(w);
  }
  return entries;
}

// The bias delta of key on this axis (spec, "The whole grid": the key's group index
// minus the query's, plus k - 1; on a periodic axis the key's unwrapped position in
// the window), or -1 when key is not a neighbor.
inline int spec_axis_delta(const SpecAxis& ax, int i, int key) {
  const int g = i % ax.d, Lg = (ax.L - g + ax.d - 1) / ax.d;
  if (key % ax.d != g) return -1;
  for (int w : spec_axis_window(ax, i))
    if (((w % Lg) + Lg) % Lg == key / ax.d) return w - i / ax.d + ax.k - 1;
  return -1;
}

// Keys (axis indices, ascending) the query at index i attends on this axis.
inline std::vector<int> spec_axis_neighbors(const SpecAxis& ax, int i) {
  const int g = i % ax.d;
  const int Lg = (ax.L - g + ax.d - 1) / ax.d;
  std::vector<int> groups;            // 5. (a periodic entry is taken modulo Lg)
  for (int w : spec_axis_window(ax, i)) groups.push_back(((w % Lg) + Lg) % Lg);
  std::vector<int> keys;
  for (int key = 0; key < ax.L; ++key)
    if (key % ax.d == g && std::find(groups.begin(), groups.end(), key / ax.d) != groups.end()) keys.push_back(key);
  return keys;
}

}  // namespace nbhd::testing
