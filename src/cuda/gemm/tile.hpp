// SPDX-License-Identifier: Apache-2.0
// Geometry of the gemm backend, host and device: query and key tiles (power-of-two
// boxes of one dilation group's grid), and slabs (contiguous runs of window slots a
// CTA keeps in shared memory at once). docs/gemm.md explains both.
#pragma once

#include "cuda/common/tile_shape.hpp"
#include "nbhd/core/window.hpp"

namespace nbhd::cuda::gemm {

inline constexpr int kWarps = 4;
inline constexpr int kThreads = 32 * kWarps;
inline constexpr int kBlockQ = 16 * kWarps;  // PN / NN: queries per tile, 16 per warp
inline constexpr int kBlockK = 64;           // keys per key tile (PN / NN), keys per IN tile
inline constexpr int kBlockQI = 32;          // IN: queries per query tile (the mma K dimension)
inline constexpr int kCols = 64;             // NN / IN output columns per CTA; PN reduces over D in chunks of this
inline constexpr int kChunkKeys = 8;         // keys per mma n8 block: the unit of per-warp skipping
inline constexpr int kMaxDim = 256;          // PN keeps the whole query tile (padded head dim) in shared memory

NBHD_HOST_DEVICE constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Tiles are cuda::TileShape (cuda/common/tile_shape.hpp). PN / NN: a query tile of
// kBlockQ queries cut into one 16-query box per warp, and the key tile the key box is
// walked in. IN: `k_log2` is the CTA's key tile (its output rows, 16 consecutive keys
// per warp) and `q_log2` the query tile it walks (kBlockQI queries); `w_log2` is
// unused.

// How a window is cut into slabs. A slab is a box of kernel offsets: one offset on
// each axis before `split_axis`, `split_extent` offsets on it, every offset on the
// axes after it; its slots are therefore one contiguous run of the row-major slot
// order. The M additional tokens (slots W..W+M-1) either ride with a single slab
// that holds the whole window, or come in slabs of their own.
struct SlabPlan {
  int split_axis = 0;    // padded axis 0..2
  int split_extent = 1;  // kernel offsets of split_axis per slab
  int window_slabs = 1;
  int extra_slabs = 0;     // 0: the additional tokens are in window slab 0 (then window_slabs == 1)
  int extra_per_slab = 0;  // additional tokens per slab of their own
  int slots = 0;           // slots of the widest slab

  NBHD_HOST_DEVICE constexpr int count() const { return window_slabs + extra_slabs; }
  // One slab holds the whole row (window and additional tokens).
  NBHD_HOST_DEVICE constexpr bool whole_row() const { return count() == 1; }
};

struct Slab {
  bool window;             // has kernel offsets (else only additional tokens)
  Range offset[kMaxRank];  // kernel offsets per axis, when `window`
  int m0, m1;              // additional tokens [m0, m1)
  int s0, s1;              // slots [s0, s1) of every row
};

NBHD_HOST_DEVICE constexpr int window_slots(const Neighborhood& nb) {
  return nb.axis[0].kernel * nb.axis[1].kernel * nb.axis[2].kernel;
}

// Slot stride of each axis in the row-major slot order.
NBHD_HOST_DEVICE constexpr int slot_stride(const Neighborhood& nb, int a) {
  return a == 0 ? nb.axis[1].kernel * nb.axis[2].kernel : a == 1 ? nb.axis[2].kernel : 1;
}

// Kernel offsets of axis `a` in window slab (c, rest): chunk c of the split axis, and
// `rest` holding the single offsets of the axes before it (the later axis fastest).
NBHD_HOST_DEVICE constexpr Range slab_offsets(const SlabPlan& plan, const Neighborhood& nb, int a, int c, int rest) {
  const int k = nb.axis[a].kernel, sa = plan.split_axis;
  if (a > sa) return {0, k};
  if (a == sa) return {c * plan.split_extent, imin((c + 1) * plan.split_extent, k)};
  const int digit = (a == 1 ? rest : sa == 2 ? rest / nb.axis[1].kernel : rest) % k;
  return {digit, digit + 1};
}

NBHD_HOST_DEVICE constexpr Slab slab_at(const SlabPlan& plan, const Neighborhood& nb, int extra, int index) {
  Slab s{};
  const int W = window_slots(nb);
  if (index >= plan.window_slabs) {
    s.window = false;
    s.m0 = (index - plan.window_slabs) * plan.extra_per_slab;
    s.m1 = imin(s.m0 + plan.extra_per_slab, extra);
    s.s0 = W + s.m0;
    s.s1 = W + s.m1;
    return s;
  }
  s.window = true;
  const int chunks = ceil_div(nb.axis[plan.split_axis].kernel, plan.split_extent);
  const int c = index % chunks, rest = index / chunks;
  // One statement per axis: indexing s.offset by a runtime axis would put s in local memory.
  s.offset[0] = slab_offsets(plan, nb, 0, c, rest);
  s.offset[1] = slab_offsets(plan, nb, 1, c, rest);
  s.offset[2] = slab_offsets(plan, nb, 2, c, rest);
  s.s0 = s.offset[0].begin * slot_stride(nb, 0) + s.offset[1].begin * slot_stride(nb, 1) + s.offset[2].begin;
  // Axes before the split axis hold one offset: the slab's slots are one run.
  s.s1 = s.s0 + s.offset[0].size() * s.offset[1].size() * s.offset[2].size();
  if (plan.extra_slabs == 0) {  // the whole window and the additional tokens
    s.m0 = 0;
    s.m1 = extra;
    s.s1 += extra;
  } else {
    s.m0 = s.m1 = 0;
  }
  return s;
}

// The slab plan for rows of at most `capacity` slots in shared memory (capacity >= 1).
NBHD_HOST_DEVICE constexpr SlabPlan plan_slabs(const Neighborhood& nb, int extra, int capacity) {
  SlabPlan p{};
  const int W = window_slots(nb);
  if (W + extra <= capacity) {
    p.split_axis = 0;
    p.split_extent = nb.axis[0].kernel;
    p.window_slabs = 1;
    p.slots = W + extra;
    return p;
  }
  // The first axis whose inner offsets fit: fewest, widest slabs.
  int sa = 0, inner = nb.axis[1].kernel * nb.axis[2].kernel;
  while (inner > capacity && sa < kMaxRank - 1) {
    ++sa;
    inner /= nb.axis[sa].kernel;
  }
  p.split_axis = sa;
  p.split_extent = imin(nb.axis[sa].kernel, imax(capacity / inner, 1));
  p.window_slabs = ceil_div(nb.axis[sa].kernel, p.split_extent);
  for (int a = 0; a < sa; ++a) p.window_slabs *= nb.axis[a].kernel;
  p.slots = p.split_extent * inner;
  if (extra > 0) {
    p.extra_per_slab = imin(extra, capacity);
    p.extra_slabs = ceil_div(extra, p.extra_per_slab);
    p.slots = imax(p.slots, p.extra_per_slab);
  }
  return p;
}

// Shared-memory carve-up of each kernel: byte offsets of its arrays, the same on host
// (launch size) and device. Every array starts on 16 bytes.
NBHD_HOST_DEVICE constexpr int align16(int bytes) { return (bytes + 15) & ~15; }

// Elements of a 16-byte vector of a type of `size` bytes.
NBHD_HOST_DEVICE constexpr int vec_elems(int size) { return 16 / size; }

// Row strides (elements) of the operand tiles. Rows read by ldmatrix (Q, K; V and X
// in 16 bits, transposed) are padded by 16 bytes: with a multiple of 16 elements per
// row, a row is an odd number of 16-byte units, so the 8 rows of one ldmatrix sit in 8
// different bank groups. float32 V and X tiles are read one float per lane down a
// column (common/mma.cuh, load_b_kn): 8 floats of padding put rows k and k + 1 8 banks apart.
NBHD_HOST_DEVICE constexpr int rowmajor_stride(int cols, int elem) { return cols + 16 / elem; }
NBHD_HOST_DEVICE constexpr int colread_stride(int cols, int) { return cols + 8; }

struct PnSmem {
  int q, k, key_delta, key_offset, row_out, tile, bytes;
  int q_stride, k_stride;  // elements
  int tile_cols;           // floats per slab row
};

// `dim_pad`: head dim rounded up to 16; `unit`: elements of the output weights per 16 bytes.
NBHD_HOST_DEVICE constexpr PnSmem pn_smem(int dim_pad, int slab_slots, int unit, int elem) {
  PnSmem s{};
  s.q_stride = rowmajor_stride(dim_pad, elem);
  s.k_stride = rowmajor_stride(imin(dim_pad, kCols), elem);
  // The slab's first slot is rounded down to a unit, so a row holds up to unit - 1
  // more slots; +4 floats staggers the rows' banks.
  s.tile_cols = round_up(slab_slots + unit - 1, unit) + 4;
  int at = 0;
  s.q = at;
  at += align16(kBlockQ * s.q_stride * elem);
  s.k = at;
  at += align16(2 * kBlockK * s.k_stride * elem);
  s.key_delta = at;
  at += align16(kBlockK * 8);
  s.key_offset = at;
  at += align16(kBlockK * 4);
  s.row_out = at;
  at += align16(2 * kBlockQ * 8);  // out row offsets, then lse row offsets
  s.tile = at;
  at += align16(kBlockQ * s.tile_cols * 4);
  s.bytes = at;
  return s;
}

// Shared memory of PN without its slab tile, and per slot of slab row.
NBHD_HOST_DEVICE constexpr int pn_fixed_bytes(int dim_pad, int elem) { return pn_smem(dim_pad, 0, 1, elem).tile; }

struct NnSmem {
  int v, key_delta, key_offset, row_offset, tile, bytes;
  int v_stride;   // elements
  int tile_cols;  // weight elements per slab row
};

NBHD_HOST_DEVICE constexpr NnSmem nn_smem(int slab_slots, int unit, int elem, int weight_elem) {
  NnSmem s{};
  s.v_stride = colread_stride(kCols, elem);
  s.tile_cols = round_up(slab_slots + unit - 1, unit) + 16 / weight_elem;
  int at = 0;
  s.v = at;
  at += align16(2 * kBlockK * s.v_stride * elem);  // also stages the output: kBlockQ == kBlockK rows
  s.key_delta = at;
  at += align16(kBlockK * 8);
  s.key_offset = at;
  at += align16(kBlockK * 4);
  s.row_offset = at;
  at += align16(2 * kBlockQ * 8);  // weight row offsets, then out row offsets
  s.tile = at;
  at += align16(kBlockQ * s.tile_cols * weight_elem);
  s.bytes = at;
  return s;
}

NBHD_HOST_DEVICE constexpr int nn_fixed_bytes(int elem) { return nn_smem(0, 1, elem, 4).tile; }

struct InSmem {
  int x, dense, bytes;
  int x_stride;      // elements
  int dense_stride;  // floats
};

NBHD_HOST_DEVICE constexpr InSmem in_smem(int elem) {
  InSmem s{};
  s.x_stride = colread_stride(kCols, elem);
  // Dense weights are read down columns (the mma A operand is their transpose):
  // 16-bit mma reads rows 2t, 2t+1 (stride = 4 banks apart), tf32 rows t (8 apart).
  s.dense_stride = kBlockK + (elem == 4 ? 8 : 4);
  int at = 0;
  s.x = at;
  // Two stages of X, which also stage the output (kBlockK rows = 2 * kBlockQI).
  at += align16(2 * kBlockQI * s.x_stride * elem);
  s.dense = at;
  at += align16(2 * kBlockQI * s.dense_stride * 4);
  s.bytes = at;
  return s;
}

static_assert(kBlockK == 2 * kBlockQI, "IN stages its kBlockK output rows in its two X stages");
static_assert(kBlockQ <= 2 * kBlockK, "NN stages its kBlockQ output rows in its two V stages");

}  // namespace nbhd::cuda::gemm
