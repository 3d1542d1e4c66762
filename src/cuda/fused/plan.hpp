// SPDX-License-Identifier: Apache-2.0
// Choosing a fused-kernel configuration for a problem: the table of tile
// configurations (data, with the reason for each entry) and the heuristic that
// picks the one computing the fewest wasted pairs. Host only, no CUDA: the tests
// run it on the CPU.
#pragma once

#include <string>
#include <vector>

#include "cuda/fused/tile_shape.hpp"
#include "nbhd/problem.hpp"

namespace nbhd::cuda::fused {

// One entry of the table. `warps` and `block_kv` select the compiled kernel
// (register and shared-memory layout); the tile shape is a runtime argument.
struct TileConfig {
  int rank;
  int head_dim;   // kernel bucket: problems with max(dim, dim_v) <= head_dim
  int warps;
  int block_kv;   // keys per key tile
  int m_tiles;    // 16-query boxes per warp (1, or 2 sharing every K/V fragment)
  TileShape shape;
  const char* why;  // the measured or counted reason for this entry
};

// Whether the kernel for (head-dim bucket, warps, key tile, boxes per warp) is in
// the build's kernel list (NBHD_DTYPES / NBHD_HEAD_DIMS filter further).
bool kernel_compiled(int head_dim, int warps, int block_kv, int m_tiles);

// Configurations available for a problem's rank and head-dim bucket.
std::vector<TileConfig> candidate_configs(int rank, int head_dim);

// Smallest compiled head-dim bucket >= max(dim, dim_v), or 0 when none.
int head_dim_bucket(int64_t dim, int64_t dim_v);

struct PlanEstimate {
  TileConfig config;
  double computed_pairs = 0;  // query-key pairs the tensor cores compute (sampled)
  double needed_pairs = 0;    // pairs the neighborhood attends (same sample)
  double visited_pairs = 0;   // pairs of every key tile a warp visits, computed or not
  double waste() const { return needed_pairs > 0 ? computed_pairs / needed_pairs : 0; }
  double cost = 0;            // what the heuristic minimises
};

// Counts, for a sample of query tiles, the pairs each configuration computes at
// the kernel's granularity (per warp, per 8-key chunk) against the pairs needed.
PlanEstimate estimate(const Problem& p, const TileConfig& c);

// All candidates with their estimates, best first.
std::vector<PlanEstimate> rank_configs(const Problem& p);

// Human-readable lines for `nbhd-bench --dry-run`.
std::vector<std::string> describe_plan(const Problem& p);

}  // namespace nbhd::cuda::fused
