// SPDX-License-Identifier: Apache-2.0
// Tiles of the fused backward: which entries of the forward's table (plan.hpp) the
// compiled backward kernels take, and the choice per pass. Host only, no CUDA: the
// tests run it on the CPU.
#pragma once

#include <string>
#include <vector>

#include "cuda/fused/plan.hpp"

namespace nbhd::cuda::fused {

// The backward kernels are compiled for CTAs of 4 warps (64 rows) and 64-column
// tiles: the key pass keeps dK and dV of its 16 keys per warp in registers (128
// floats per thread at head dim 128), which leaves no room for the 128-column tiles
// or the 8-warp CTAs (2 x 16 KB more K and V, one CTA per SM) the forward also uses.
// float32 at head dim 128 takes 32-column tiles: with 64 its key pass would need
// 208 KB of shared memory and its dq pass 192 KB (sm_80 allows 163).
inline constexpr int kBackwardWarps = 4;
inline constexpr int backward_cols(DType dtype, int head_dim) {
  return dtype == DType::kFloat32 && head_dim == 128 ? 32 : 64;
}

// Table entries the backward kernels run for a dtype, rank and head-dim bucket
// (<= 128): the mma.sync ones (4 warps, backward_cols columns), then, with `hopper`
// (an sm_90 device and a build with sm_90a), the wgmma key pass's: the forward's
// warp-specialized entries (8 warps: 128 keys, 64-query tiles), 16-bit at head dims
// 64 and 128. NBHD_FUSED_BACKWARD_TILE indexes this list.
std::vector<TileConfig> backward_candidates(DType dtype, int rank, int head_dim, bool hopper = false);

// Why the wgmma key pass cannot run a backward of p (d_rpb: d rpb is asked for, with
// or without an rpb), or "" when it can. Its rpb paths are compiled at head dim 64
// only (at 128 they made ptxas spill; backward_wgmma_kernel.cuh); it bins d rpb by
// shared-memory atomics, in no fixed order, so the deterministic mode takes the
// mma.sync key pass for d rpb (fixed-order partial sums). The planner asks with
// d_rpb = p.has_rpb and not deterministic; the launch asks again with the call's.
std::string wgmma_key_pass_refusal(const Problem& p, bool d_rpb, bool deterministic);

// The key pass's counterpart of estimate(): rows are keys (the entry's query tile
// and warp boxes), columns are query tiles (its key tile) walked over the inverse-
// window union of each key tile; mma.sync skips chunks per warp against the union
// of its keys' inverse windows, wgmma computes a tile whole for a warpgroup's 64
// keys when any of them reaches it.
PlanEstimate estimate_key_pass(const Problem& p, const TileConfig& c);

struct BackwardPlan {
  TileConfig key_pass;  // rows keys, columns queries; wgmma: the sm_90a key pass
  TileConfig dq_pass;   // the forward's orientation (mma.sync)
  // dQ by the dq pass (recomputing S and dP per query tile) rather than by float32
  // atomics from the key pass; always so in deterministic mode.
  bool dq_by_pass = false;
};

// Whether dQ should come from the dq pass in the default mode: for windows of at
// most kDqPassMaxWindow keys per query the problem is bound by memory, and the
// atomic path's float32 dQ (zeroed, accumulated in L2, converted: ~5x the bytes of
// dQ itself) costs more than the dq pass's two extra products per tile pair
// (S and dP again; 7 products instead of 5). NBHD_FUSED_BACKWARD_DQ=atomics|pass
// overrides it (for measuring).
inline constexpr int64_t kDqPassMaxWindow = 128;
bool prefer_dq_pass(const Problem& p);

// NBHD_FUSED_BACKWARD_DQ=halo (not yet timed, so only when asked): the dq pass of
// backward_halo_kernel.cuh, on the first 4-warp halo entry of the forward's table
// that runs p with Q and dO rows (halo_refusal). True and the entry where there is one.
bool halo_dq_entry(const Problem& p, TileConfig* entry);
// Whether the backward runs the halo dq pass on p: asked for
// (NBHD_FUSED_BACKWARD_DQ=halo), or by default (halo_by_default, no
// NBHD_FUSED_BACKWARD_DQ), where an entry runs it.
bool halo_dq_chosen(const Problem& p, TileConfig* entry);
bool halo_dq_asked();

// NBHD_FUSED_BACKWARD_KEY=halo (not yet timed): the key pass of
// backward_halo_kernel.cuh, on the first 4-warp halo entry of the forward's table
// (its query tile as the key tile) whose query box fits with K and V and the bias
// bins (halo_key_pass_shared_bytes), without additional tokens or deterministic d rpb
// (d_rpb: asked for).
bool halo_key_entry(const Problem& p, bool d_rpb, bool deterministic, TileConfig* entry);
// The same for the halo key pass (NBHD_FUSED_BACKWARD_KEY=halo, or by default without
// NBHD_FUSED_BACKWARD_KEY; =tiled keeps the tiled or wgmma key pass).
bool halo_key_chosen(const Problem& p, bool d_rpb, bool deterministic, TileConfig* entry);
bool halo_key_asked();
// The most queries a key tile of shape s.q has in its query box (the union of its
// keys' inverse windows, clipped to the computed queries), over every tile of every
// dilation group.
int halo_key_rows_bound(const Problem& p, const TileShape& s);

// The candidates of least cost per pass (the forward's cost model; the wgmma key
// pass only with `hopper` and where it runs the problem). Needs max(dim, dim_v) <=
// 128: backward_candidates must not be empty.
BackwardPlan plan_backward(const Problem& p, bool hopper = false);

// Human-readable lines for `nbhd-bench --dry-run`.
std::vector<std::string> describe_backward_plan(const Problem& p, bool hopper = false);

}  // namespace nbhd::cuda::fused
