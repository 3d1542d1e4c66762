// SPDX-License-Identifier: Apache-2.0
// Host-side decisions of the gemm backend, plain C++ (the CPU tests run them): the
// tile shapes of PN / NN and of IN, chosen per problem from small tables by counting
// the work each computes; how many slots of a row fit in shared memory; the
// workspace's padded rows.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/gemm/tile.hpp"
#include "nbhd/problem.hpp"

namespace nbhd::cuda::gemm {

// Slots the workspace reserves per attention-weight row: W + M rounded up to 8, so
// every row starts on 16 bytes for float32 and 16-bit weights alike (docs/gemm.md).
inline constexpr int kRowAlign = 8;
inline int64_t padded_slots(const Problem& p) {
  return (p.window_size() + p.additional_tokens + kRowAlign - 1) / kRowAlign * kRowAlign;
}

struct ShapeChoice {
  TileShape shape;
  const char* why;  // what the entry is for
  double cost = 0;  // what the planner minimises (lower is better)
};

// Candidate shapes of a rank: PN / NN (query tile, warp boxes, key tile) and IN (key
// tile, query tile).
std::vector<ShapeChoice> query_candidates(int rank);
std::vector<ShapeChoice> inverse_candidates(int rank);

// Estimated cost per needed (query, key) pair of PN / NN with `shape` when a slab row
// holds `slab_capacity` slots: pairs the tensor cores compute (per warp, per 8-key
// chunk, every slab's key box), chunks visited but skipped, and per-key-tile overhead.
double query_cost(const Problem& p, const TileShape& shape, int slab_capacity);
// IN: dense (query, key) elements gathered and multiplied per needed pair.
double inverse_cost(const Problem& p, const TileShape& shape);

// Largest slab (slots per row) whose PN / NN shared memory fits in `budget` bytes;
// 0 when not even one slot fits. `unit`: weight elements per 16 bytes.
int pn_capacity(int budget, int dim_pad, int elem, int unit);
int nn_capacity(int budget, int elem, int weight_elem, int unit);

// Shared memory a CTA may use: half an SM (two CTAs per SM) unless a kernel needs
// more, up to the opt-in maximum.
struct SmemLimits {
  int per_block_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int per_sm;           // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int two_per_sm() const;
};
// Below this many slots per slab, a kernel takes the opt-in maximum instead.
inline constexpr int kMinSlabSlots = 64;

struct Plan {
  ShapeChoice query;    // PN and NN
  ShapeChoice inverse;  // IN
};

// The cheapest candidates for `p` (slab capacity from PN with float32 weights, the
// workspace's type).
Plan make_plan(const Problem& p, const SmemLimits& limits);

// Human-readable lines for `nbhd-bench --dry-run`.
std::vector<std::string> describe_plan(const Problem& p, const SmemLimits& limits);

}  // namespace nbhd::cuda::gemm
