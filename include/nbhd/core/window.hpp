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
// kernel >= 1, dilation >= 1, kernel * dilation <= length, 1 <= stride <= kernel,
// and not both causal and periodic (Problem::validate checks this before any
// backend sees an Axis).
//
// A periodic axis wraps around (longitude, a torus): every window is centered on
// its leader and never shifted. Its ranges are unwrapped: they may begin below 0 or
// end past the group length, and `wrap` names the group index an entry stands for.
// The unwrapped position is what the bias counts (rpb_index).
struct Axis {
  int length = 1;
  int kernel = 1;
  int dilation = 1;
  int stride = 1;
  bool causal = false;
  bool periodic = false;

  // Tokens i with i % dilation == g form dilation group g; inside it a token's
  // index is i / dilation.
  NBHD_HOST_DEVICE constexpr int group_length(int g) const {
    return (length - g + dilation - 1) / dilation;
  }

  // The group index an (unwrapped) window entry j stands for: j itself, or j modulo
  // the group length on a periodic axis. Entries of windows and their unions lie in
  // [-lg, 2 lg) (a window holds at most lg keys): one add or subtract there, the
  // remainders only beyond (integer remainders are ~20 instructions each on a GPU,
  // and the fused kernels' seam tiles wrap every row).
  NBHD_HOST_DEVICE constexpr int wrap(int j, int lg) const {
    if (!periodic || (j >= 0 && j < lg)) return j;
    if (j >= -lg && j < 2 * lg) return j < 0 ? j + lg : j - lg;
    return ((j % lg) + lg) % lg;
  }

  // Keys (group indices) seen by the query at group index j of a group of length lg.
  // Non-causal windows hold exactly `kernel` keys, shifted inward at the borders
  // (periodic: centered, unwrapped); causal windows end at the query and hold at
  // most `kernel` keys.
  NBHD_HOST_DEVICE constexpr Range window(int j, int lg) const {
    if (causal) {
      const int leader = imin(j / stride * stride + stride - 1, lg - 1);
      return {imax(leader - kernel + 1, 0), j + 1};
    }
    const int leader = imin(j / stride * stride + stride / 2, lg - 1);
    if (periodic) return {leader - kernel / 2, leader - kernel / 2 + kernel};
    const int start = imax(imin(leader - kernel / 2, lg - kernel), 0);
    return {start, start + kernel};
  }

  // Queries (group indices) whose window holds key jk: one contiguous range, since
  // a window's begin and end never decrease as the query moves forward. Closed
  // forms of `window` inverted; tests check them against a search over all queries.
  // Periodic: one circular range, unwrapped next to the key (it may begin below 0 or
  // end past lg - 1), at most lg long: each query j's window, shifted by j - wrap(j),
  // holds jk itself, so jk - j + kernel - 1 is the bias index.
  NBHD_HOST_DEVICE constexpr Range inverse_window(int jk, int lg) const {
    if (periodic) return inverse_periodic(jk, lg);
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
  // Periodic: unwrapped, and longer than lg when the run is long (some keys twice).
  NBHD_HOST_DEVICE constexpr Range window_union(Range q, int lg) const {
    return {window(q.begin, lg).begin, window(q.end - 1, lg).end};
  }

  // Queries whose windows meet a run of keys [k.begin, k.end). Periodic: unwrapped
  // as the keys' inverse windows are (they move with the key, so the union is a run
  // plus a window long).
  NBHD_HOST_DEVICE constexpr Range inverse_window_union(Range k, int lg) const {
    return {inverse_window(k.begin, lg).begin, inverse_window(k.end - 1, lg).end};
  }

 private:
  // Queries in [0, lg) whose periodic window [p - left, p - left + kernel) holds the
  // unwrapped position x: leader p in [x - right, x + left]. Leaders never decrease
  // with the query, so this is one range (possibly empty).
  NBHD_HOST_DEVICE constexpr Range queries_seeing(int x, int lg) const {
    const int lo = x - (kernel - 1 - kernel / 2), hi = x + kernel / 2, half = stride / 2;
    if (lo > lg - 1 || hi < half) return {0, 0};
    // Leader j / s * s + s/2 (capped at lg - 1) reaches lo from this query on...
    const int first = lo - half <= 0 ? 0 : ceil_div(lo - half, stride) * stride;
    // ...and stays at or below hi up to this one.
    const int last = hi >= lg - 1 ? lg - 1 : imin(lg - 1, ((hi - half) / stride + 1) * stride - 1);
    return first > last ? Range{0, 0} : Range{first, last + 1};
  }

  // Key jk is seen through one of its images jk - lg, jk, jk + lg. The leaders span
  // less than lg, so at most two adjacent images are seen: by the first queries (the
  // lower image) and the last ones (the higher image). A query that sees image jk + m
  // lg is listed as j - m lg, whose shifted window holds jk: one contiguous range.
  NBHD_HOST_DEVICE constexpr Range inverse_periodic(int jk, int lg) const {
    Range r{0, 0};
    for (int m = -1; m <= 1; ++m) {
      const Range seen = queries_seeing(jk + m * lg, lg);
      if (seen.size() <= 0) continue;
      const Range moved{seen.begin - m * lg, seen.end - m * lg};
      r = r.size() > 0 ? Range{imin(r.begin, moved.begin), imax(r.end, moved.end)} : moved;
    }
    return r;
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
      if (window_position(ax, query[a], key[a]) < 0) return false;
    }
    return true;
  }

  // The unwrapped window entry of key on axis a as seen from query (same dilation
  // group), or -1 when the key is not in the query's window.
  NBHD_HOST_DEVICE static constexpr int window_position(const Axis& ax, int query, int key) {
    const int lg = ax.group_length(query % ax.dilation), jk = key / ax.dilation;
    const Range w = ax.window(query / ax.dilation, lg);
    if (w.contains(jk)) return jk;
    if (ax.periodic && w.contains(jk - lg)) return jk - lg;
    if (ax.periodic && w.contains(jk + lg)) return jk + lg;
    return -1;
  }

  // Relative-position-bias index of window entry j (unwrapped) on axis a: (j -
  // query) in group units, shifted by kernel - 1 into [0, 2 * kernel - 2].
  NBHD_HOST_DEVICE static constexpr int rpb_entry(const Axis& ax, int query, int j) {
    return j - query / ax.dilation + ax.kernel - 1;
  }

  // The same for a neighbor given as a key token (on a periodic axis, its position
  // in the window is found first).
  NBHD_HOST_DEVICE static constexpr int rpb_index(const Axis& ax, int query, int key) {
    return rpb_entry(ax, query, ax.periodic ? window_position(ax, query, key) : key / ax.dilation);
  }
};

}  // namespace nbhd
