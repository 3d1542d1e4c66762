// SPDX-License-Identifier: Apache-2.0
// Choosing a fused-kernel configuration for a problem: the table of tile
// configurations (data, with the reason for each entry) and the heuristic that
// picks the one computing the fewest wasted pairs. Host only, no CUDA: the tests
// run it on the CPU.
#pragma once

#include <string>
#include <vector>

#include "core/layout.hpp"
#include "cuda/common/tile_shape.hpp"
#include "cuda/common/tma_view.hpp"
#include "nbhd/problem.hpp"

namespace nbhd::cuda::fused {

// One entry of the table. `warps`, `block_kv`, `m_tiles` and `wgmma` select the
// compiled kernel (register and shared-memory layout, instruction path); the tile
// shape is a runtime argument.
struct TileConfig {
  int rank;
  int head_dim;   // kernel bucket: problems with max(dim, dim_v) <= head_dim
  int warps;
  int block_kv;   // keys per key tile
  int m_tiles;    // 16-query boxes per warp (1, or 2 sharing every K/V fragment)
  TileShape shape;
  const char* why;  // the measured or counted reason for this entry
  bool wgmma = false;  // Hopper warpgroup instructions (sm_90a) instead of mma.sync
  // The halo kernel (forward_halo_kernel.cuh): the tile's whole key box loaded once,
  // no key tiles (block_kv 0; shape.k unused).
  bool halo = false;
};

// Whether the kernel for (dtype, head-dim bucket, warps, key tile, boxes per warp,
// instruction path, halo) is in the build's kernel list (NBHD_DTYPES /
// NBHD_HEAD_DIMS / NBHD_CUDA_ARCHS filter further).
bool kernel_compiled(DType dtype, int head_dim, int warps, int block_kv, int m_tiles, bool wgmma, bool halo);

// The most keys a query tile of shape `s` has in its key box (the union of its
// queries' windows), the halo kernel's rows of K and V: per axis q + kernel + stride
// - 2 (the windows of q queries begin at most q + stride - 2 apart), at most the
// group's length on an axis that does not wrap.
int halo_rows_bound(const Problem& p, const TileShape& s);

// Whether the halo kernels are the default for p: 16-bit, rank 1 or 2, windows of at
// most kHaloDefaultMaxKernel per axis (the measured range: on an H100 the halo forward
// ran 1.34-1.74x the tiled one on 1-D and 2-D windows of 7-13 and tied at 3-D k5; its
// backward passes 1.45-1.70x; docs/performance.md, "The halo kernel").
inline constexpr int kHaloDefaultMaxKernel = 13;
bool halo_by_default(const Problem& p);

// "" where the halo entry `c` runs `p` (any other entry: ""), else why not: its key
// box and `query_tensors` tensors of query rows (the forward's Q; the dq pass's Q and
// dO) need more than kHaloMaxSharedBytes of shared memory, or additional tokens.
std::string halo_refusal(const Problem& p, const TileConfig& c, int query_tensors = 1);

// Whether this build has the sm_90a (wgmma) forward kernels.
bool wgmma_kernels_built();

// Configurations available for a problem's dtype, rank and head-dim bucket; the
// wgmma ones only when `hopper` (an sm_90 device, and a build with sm_90a).
std::vector<TileConfig> candidate_configs(DType dtype, int rank, int head_dim, bool hopper = false);

// Smallest head-dim bucket >= max(dim, dim_v), or 0 when none.
int head_dim_bucket(int64_t dim, int64_t dim_v);

struct PlanEstimate {
  TileConfig config;
  int candidate = -1;         // index in candidate_configs (what NBHD_FUSED_TILE takes)
  double computed_pairs = 0;  // query-key pairs the tensor cores compute (sampled)
  double needed_pairs = 0;    // pairs the neighborhood attends (same sample)
  double visited_pairs = 0;   // pairs of every key tile a warp visits, computed or not
  double warp_tiles = 0;      // (warp, key tile of its CTA's key box) pairs
  double masked_warp_tiles = 0;  // of those, the ones that need the element mask
  double masked_fraction() const { return warp_tiles > 0 ? masked_warp_tiles / warp_tiles : 0; }
  double waste() const { return needed_pairs > 0 ? computed_pairs / needed_pairs : 0; }
  double cost = 0;            // what the heuristic minimises
  std::string refused;        // why the planner never chooses it ("": it may)
};

// Counts, for a sample of query tiles, the pairs each configuration computes at
// the kernel's granularity (per warp, per 8-key chunk) against the pairs needed.
PlanEstimate estimate(const Problem& p, const TileConfig& c);

// What the forward and backward planners share. The origins of the CTA tiles (extent
// s.q per axis) they sample along each axis of dilation group 0: up to 8 per axis,
// evenly spread, borders included (they shift windows inward).
void sample_tile_origins(const Neighborhood& nb, const TileShape& s, std::vector<int> (&origins)[kMaxRank]);
// Adds to `e` the pairs of one warp whose windows (or inverse windows) span `uni`,
// walking `box` in tiles of s.k: computed = its 16 rows x 8 keys per chunk that
// meets `uni`, visited = every chunk of the tiles it does not skip. Per axis the
// tile and chunk conditions are independent, so counts are products of per-axis
// counts.
void add_warp_chunks(const TileShape& s, const Range* box, const Range* uni, PlanEstimate* e);
// The pairs charged for `e`'s work: the kernel issues an ldmatrix and two mma slots
// for every chunk of a visited tile (inactive ones predicated off) and is bound by
// issue more than by the tensor pipe (ncu, H200: IPC 1.7, tensor pipe ~30%), so
// visited chunks count 0.6 of active ones.
double charged_pairs(const PlanEstimate& e);

// Over every query tile of shape s in dilation group 0 (of a query sub-box, its part),
// the key tiles of the tiles' key boxes (what a CTA loads), and of those the ones that
// reach past a periodic axis's group (loaded row by row). Exact: per axis the counts
// are independent, so the totals are products of per-axis sums.
struct KeyTileCount {
  double loaded = 0;
  double wrapped = 0;
};
KeyTileCount key_tile_count(const Problem& p, const TileShape& s);

// All candidates with their estimates, best first.
std::vector<PlanEstimate> rank_configs(const Problem& p, bool hopper = false);

// How the forward of `c` loads q, k and v: "" where its producer copies them by TMA
// (and views[0..3) are the tensor-map views of q, k and v), else why it copies them
// by cp.async. TMA is the warp-specialized kernels' (wgmma, 8 warps), for tensors a
// tensor map can address (tma_view.hpp), without additional tokens, and with
// dim == dim_v == the head-dim bucket (a copy of 64 columns has no room for the
// zero columns a padded head dim needs), and only with NBHD_FUSED_LOADS=tma: on an
// H100 the TMA producers ran 1.2-1.36x slower than cp.async in the forward and up
// to 1.1x in the key pass (docs/performance.md, "TMA producers"), not yet explained.
std::string forward_tma_views(const Problem& p, const TileConfig& c, const detail::TokenLayout& q,
                              const detail::TokenLayout& k, const detail::TokenLayout& v, TmaView* views);

// The same for the wgmma key pass of the backward: "" where its producer copies each
// query tile's Q and dO by TMA (views[0..2) of q and d_out), else why by cp.async.
std::string key_pass_tma_views(const Problem& p, const TileConfig& c, const detail::TokenLayout& q,
                               const detail::TokenLayout& dout, TmaView* views);

// A contiguous [B, X..., H, D] tensor's layout (what --dry-run assumes).
detail::TokenLayout contiguous_layout(const Problem& p, int64_t heads, int64_t dim);

// Human-readable lines for `nbhd-bench --dry-run`.
std::vector<std::string> describe_plan(const Problem& p, bool hopper = false);

}  // namespace nbhd::cuda::fused
