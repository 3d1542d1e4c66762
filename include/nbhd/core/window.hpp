// SPDX-License-Identifier: Apache-2.0
// The one definition of a neighborhood (spec: ../shared/spec/semantics.md), used by
// every backend on host and device. Everything here is per axis; a token's
// neighborhood is the product of its axes' windows (see `Neighborhood` below).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NBHD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NBHD_HOST_DEVICE inline
#endif

namespace nbhd {

inline constexpr int kMaxRank = 3;

NBHD_HOST_DEVICE constexpr int imin(int a, int b) { return a < b ? a : b; }
NBHD_HOST_DEVICE constexpr int imax(int a, int b) { return a > b ? a : b; }
NBHD_HOST_DEVICE constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Half-open range [begin, end) of indices inside one dilation group.
struct Range {
  int begin;
  int end;
  NBHD_HOST_DEVICE constexpr int size() const { return end - begin; }
  NBHD_HOST_DEVICE constexpr bool contains(int j) const { return begin <= j && j < end; }
};

// One axis of the token grid with its neighborhood parameters. Valid when
// kernel >= 1, dilation >= 1, kernel * dilation <= length, 1 <= stride <= kernel
// (Problem::validate checks this before any backend sees an Axis).
struct Axis {
  int length = 1;
  int kernel = 1;
  int dilation = 1;
  int stride = 1;
  bool causal = false;

  // Tokens i with i % dilation == g form dilation group g; inside it a token's
  // index is i / dilation.
  NBHD_HOST_DEVICE constexpr int group_length(int g) const {
    return (length - g + dilation - 1) / dilation;
  }

  // Keys (group indices) seen by the query at group index j of a group of length lg.
  // Non-causal windows hold exactly `kernel` keys, shifted inward at the borders;
  // causal windows end at the query and hold at most `kernel` keys.
  NBHD_HOST_DEVICE constexpr Range window(int j, int lg) const {
    if (causal) {
      const int leader = imin(j / stride * stride + stride - 1, lg - 1);
      return {imax(leader - kernel + 1, 0), j + 1};
    }
    const int leader = imin(j / stride * stride + stride / 2, lg - 1);
    const int start = imax(imin(leader - kernel / 2, lg - kernel), 0);
    return {start, start + kernel};
  }

  // Queries (group indices) whose window holds key jk: one contiguous range, since
  // a window's begin and end never decrease as the query moves forward. Closed
  // forms of `window` inverted; tests check them against a search over all queries.
  NBHD_HOST_DEVICE constexpr Range inverse_window(int jk, int lg) const {
    if (causal) {
      // begin: the key's own index (every window ends at its query, and the query
      // jk sees itself). end: past the last query whose leader p satisfies
      // p - kernel + 1 <= jk.
      const int last = lg - 1 <= jk + kernel - 1
                           ? lg - 1
                           : imin(lg - 1, ((jk + kernel - stride) / stride + 1) * stride - 1);
      return {jk, last + 1};
    }
    const int left = kernel / 2;
    const int right = kernel - 1 - left;
    const int half_stride = stride / 2;
    // First query whose window end passes jk: its leader must reach jk - right.
    const int need = jk - right - half_stride;
    const int first = jk - kernel + 1 <= 0 ? 0 : ceil_div(imax(need, 0), stride) * stride;
    // Last query whose window begins at or before jk.
    int last = lg - 1;
    if (jk < lg - kernel && jk + left < lg - 1) {
      last = imin(lg - 1, ((jk + left - half_stride) / stride + 1) * stride - 1);
    }
    return {first, last + 1};
  }

  // Window of a run of queries [q.begin, q.end): the union of their windows.
  NBHD_HOST_DEVICE constexpr Range window_union(Range q, int lg) const {
    return {window(q.begin, lg).begin, window(q.end - 1, lg).end};
  }

  // Queries whose windows meet a run of keys [k.begin, k.end).
  NBHD_HOST_DEVICE constexpr Range inverse_window_union(Range k, int lg) const {
    return {inverse_window(k.begin, lg).begin, inverse_window(k.end - 1, lg).end};
  }
};

// The neighborhood of a rank-1..3 grid, always stored as 3 axes: a rank-r problem
// fills the last r axes and leaves the leading ones at length 1, kernel 1, so one
// code path serves every rank.
struct Neighborhood {
  Axis axis[kMaxRank];

  // Per axis: the token's dilation group and its window (group indices). Key index
  // jk on axis a is token coordinate group[a] + dilation * jk.
  struct Windows {
    int group[kMaxRank];
    Range range[kMaxRank];
  };

  NBHD_HOST_DEVICE constexpr Windows windows(const int* token) const {
    Windows w{};
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = axis[a];
      w.group[a] = token[a] % ax.dilation;
      w.range[a] = ax.window(token[a] / ax.dilation, ax.group_length(w.group[a]));
    }
    return w;
  }

  // Same for a key: the queries whose windows hold it.
  NBHD_HOST_DEVICE constexpr Windows inverse_windows(const int* token) const {
    Windows w{};
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = axis[a];
      w.group[a] = token[a] % ax.dilation;
      w.range[a] = ax.inverse_window(token[a] / ax.dilation, ax.group_length(w.group[a]));
    }
    return w;
  }

  NBHD_HOST_DEVICE constexpr bool is_neighbor(const int* query, const int* key) const {
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = axis[a];
      const int g = query[a] % ax.dilation;
      if (key[a] % ax.dilation != g) return false;
      if (!ax.window(query[a] / ax.dilation, ax.group_length(g)).contains(key[a] / ax.dilation))
        return false;
    }
    return true;
  }

  // Relative-position-bias index of a neighbor on axis a: (key - query) in group
  // units, shifted by kernel - 1 into [0, 2 * kernel - 2].
  NBHD_HOST_DEVICE static constexpr int rpb_index(const Axis& ax, int query, int key) {
    return key / ax.dilation - query / ax.dilation + ax.kernel - 1;
  }
};

}  // namespace nbhd
