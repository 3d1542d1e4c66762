// SPDX-License-Identifier: Apache-2.0
// How the naive kernels walk the grid: a row's (batch, token, head), a query's window
// slots (PN, NN), a key's inverse neighborhood (IN), the slot of a relative position
// (d rpb). Host and device, built only on core/window.hpp, so the CPU tests check
// every index the kernels compute.
#pragma once

#include <cstdint>

#include "nbhd/core/window.hpp"

namespace nbhd::cuda::naive {

// a / b for non-negative values; 32-bit when both fit, several times cheaper than a
// 64-bit division on the GPU.
NBHD_HOST_DEVICE int64_t divide(int64_t a, int64_t b) {
  return ((a | b) >> 32) == 0 ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}

// The tokens whose rows a kernel walks: the problem's query sub-box (begin and
// extent per padded axis; the whole grid without one) or, for key rows, the grid.
// Tensors of the box (queries, outputs, weights, lse) hold only its tokens and are
// indexed by box coordinates (token - begin).
struct TokenBox {
  int begin[kMaxRank];
  int extent[kMaxRank];

  NBHD_HOST_DEVICE int64_t tokens() const { return int64_t(extent[0]) * extent[1] * extent[2]; }
  NBHD_HOST_DEVICE bool contains(const int* token) const {
    bool in = true;
    for (int a = 0; a < kMaxRank; ++a) in &= token[a] >= begin[a] && token[a] < begin[a] + extent[a];
    return in;
  }
};

NBHD_HOST_DEVICE TokenBox whole_grid(const Neighborhood& nb) {
  return {{0, 0, 0}, {nb.axis[0].length, nb.axis[1].length, nb.axis[2].length}};
}

// Row `row` of a [B, box..., heads, ...] tensor walked in memory order (head fastest,
// then the box's tokens row-major, then the batch): `token` on the grid, `box_token`
// in the box's tensors.
struct RowIndex {
  int64_t batch;
  int token[kMaxRank];
  int box_token[kMaxRank];
  int64_t head;
};

NBHD_HOST_DEVICE RowIndex decode_row(int64_t row, const TokenBox& box, int64_t heads) {
  RowIndex r{};
  const int64_t bt = divide(row, heads);
  r.head = row - bt * heads;
  r.batch = divide(bt, box.tokens());
  int64_t t = bt - r.batch * box.tokens();
  for (int a = kMaxRank - 1; a > 0; --a) {
    const int64_t rest = divide(t, box.extent[a]);
    r.box_token[a] = int(t - rest * box.extent[a]);
    t = rest;
  }
  r.box_token[0] = int(t);
  for (int a = 0; a < kMaxRank; ++a) r.token[a] = box.begin[a] + r.box_token[a];
  return r;
}

// Advances `box_token` to the next token of the box in row-major order; returns true
// when it wrapped around to the first token (the walk enters the next batch).
NBHD_HOST_DEVICE bool next_token(int* box_token, const TokenBox& box) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    if (++box_token[a] < box.extent[a]) return false;
    box_token[a] = 0;
  }
  return true;
}

// The grid token of a box token.
NBHD_HOST_DEVICE void grid_token(const TokenBox& box, const int* box_token, int* token) {
  for (int a = 0; a < kMaxRank; ++a) token[a] = box.begin[a] + box_token[a];
}

NBHD_HOST_DEVICE int window_slots(const Neighborhood& nb) {
  return nb.axis[0].kernel * nb.axis[1].kernel * nb.axis[2].kernel;
}

// The token coordinate of (unwrapped) window entry j on axis a of group `group`: on
// a periodic axis j wraps modulo the group length (Axis::wrap).
NBHD_HOST_DEVICE int entry_token(const Axis& ax, int group, int j) {
  return group + ax.dilation * (ax.periodic ? ax.wrap(j, ax.group_length(group)) : j);
}

// Calls f(slot, key, valid) for every slot 0..W-1 of a query's window `w`, in slot
// order (row-major over the kernel offsets; on a periodic axis, window order). The
// trip count is the same for every query, which the warp-level reductions of PN
// rely on; `valid` is false for the slots a causal window does not reach, and then
// `key` is not a token.
template <class F>
NBHD_HOST_DEVICE void for_each_window_slot(const Neighborhood& nb, const Neighborhood::Windows& w, F&& f) {
  int slot = 0;
  int key[kMaxRank];
  for (int o0 = 0; o0 < nb.axis[0].kernel; ++o0) {
    const int j0 = w.range[0].begin + o0;
    key[0] = entry_token(nb.axis[0], w.group[0], j0);
    for (int o1 = 0; o1 < nb.axis[1].kernel; ++o1) {
      const int j1 = w.range[1].begin + o1;
      key[1] = entry_token(nb.axis[1], w.group[1], j1);
      for (int o2 = 0; o2 < nb.axis[2].kernel; ++o2, ++slot) {
        const int j2 = w.range[2].begin + o2;
        key[2] = entry_token(nb.axis[2], w.group[2], j2);
        f(slot, key, j0 < w.range[0].end && j1 < w.range[1].end && j2 < w.range[2].end);
      }
    }
  }
}

// Calls f(slot, key) for each neighbor of a query with windows `w`, in slot order.
template <class F>
NBHD_HOST_DEVICE void for_each_neighbor(const Neighborhood& nb, const Neighborhood::Windows& w, F&& f) {
  int key[kMaxRank];
  for (int j0 = w.range[0].begin; j0 < w.range[0].end; ++j0) {
    key[0] = entry_token(nb.axis[0], w.group[0], j0);
    const int s0 = j0 - w.range[0].begin;
    for (int j1 = w.range[1].begin; j1 < w.range[1].end; ++j1) {
      key[1] = entry_token(nb.axis[1], w.group[1], j1);
      const int s1 = s0 * nb.axis[1].kernel + (j1 - w.range[1].begin);
      for (int j2 = w.range[2].begin; j2 < w.range[2].end; ++j2) {
        key[2] = entry_token(nb.axis[2], w.group[2], j2);
        f(s1 * nb.axis[2].kernel + (j2 - w.range[2].begin), key);
      }
    }
  }
}

// The slot offset on axis a of key index jk in the window of query index jq: its
// entry minus the window's begin (on a periodic axis, the image of jk the window
// holds).
NBHD_HOST_DEVICE int window_offset(const Axis& ax, int jq, int jk, int lg) {
  const Range w = ax.window(jq, lg);
  if (ax.periodic && !w.contains(jk)) jk += w.contains(jk - lg) ? -lg : lg;
  return jk - w.begin;
}

// Calls f(query, slot) for each query whose window holds `key` (the inverse
// neighborhood, from Axis::inverse_window; on a periodic axis a circular range,
// unwrapped), with the slot `key` has in that query's window. Queries come in
// row-major order over the unwrapped ranges.
template <class F>
NBHD_HOST_DEVICE void for_each_inverse_neighbor(const Neighborhood& nb, const int* key, F&& f) {
  const Neighborhood::Windows inv = nb.inverse_windows(key);
  int jk[kMaxRank], lg[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    jk[a] = key[a] / nb.axis[a].dilation;
    lg[a] = nb.axis[a].group_length(inv.group[a]);
  }
  int query[kMaxRank];
  for (int j0 = inv.range[0].begin; j0 < inv.range[0].end; ++j0) {
    const int q0 = nb.axis[0].wrap(j0, lg[0]);
    query[0] = inv.group[0] + nb.axis[0].dilation * q0;
    const int s0 = window_offset(nb.axis[0], q0, jk[0], lg[0]);
    for (int j1 = inv.range[1].begin; j1 < inv.range[1].end; ++j1) {
      const int q1 = nb.axis[1].wrap(j1, lg[1]);
      query[1] = inv.group[1] + nb.axis[1].dilation * q1;
      const int s1 = s0 * nb.axis[1].kernel + window_offset(nb.axis[1], q1, jk[1], lg[1]);
      for (int j2 = inv.range[2].begin; j2 < inv.range[2].end; ++j2) {
        const int q2 = nb.axis[2].wrap(j2, lg[2]);
        query[2] = inv.group[2] + nb.axis[2].dilation * q2;
        f(query, s1 * nb.axis[2].kernel + window_offset(nb.axis[2], q2, jk[2], lg[2]));
      }
    }
  }
}

// The window slot of `query` whose key sits at relative-position-bias index `delta`
// (per axis, in [0, 2k - 2], see Neighborhood::rpb_index), or -1 when that key is
// not a neighbor.
NBHD_HOST_DEVICE int rpb_slot(const Neighborhood& nb, const int* query, const int* delta) {
  const Neighborhood::Windows w = nb.windows(query);
  int slot = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int j = query[a] / ax.dilation + delta[a] - (ax.kernel - 1);
    if (!w.range[a].contains(j)) return -1;
    slot = slot * ax.kernel + (j - w.range[a].begin);
  }
  return slot;
}

}  // namespace nbhd::cuda::naive
