// SPDX-License-Identifier: Apache-2.0
// The fused kernels' tile table and planner (host code, runs on the CPU): every
// table entry is a valid tiling, row and key numbering cover their boxes exactly,
// and the chosen tilings waste no more than ../shared/design/tiling.md counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "cuda/fused/plan.hpp"

namespace nbhd::cuda::fused {
namespace {

// A query sub-box's tiles (tile_grid over the box's extents, group_indices per
// group): on small axes, every dilation group's indices are exactly its tokens in
// the box, and the tiles of the longest group cover them.
TEST(FusedPlan, QuerySubBoxTilesCoverTheBoxOfEveryGroup) {
  for (int length = 1; length <= 24; ++length)
    for (int dilation = 1; dilation <= length; ++dilation)
      for (int first = 0; first < length; ++first)
        for (int last = first + 1; last <= length; ++last)
          for (int log2 = 0; log2 <= 3; ++log2) {
            Neighborhood nb{};
            nb.axis[2].length = length;
            nb.axis[2].dilation = dilation;
            nb.axis[2].kernel = 1;
            const int tile[kMaxRank] = {0, 0, log2}, extent[kMaxRank] = {1, 1, last - first};
            const TileGrid grid = tile_grid(nb, tile, extent);
            for (int g = 0; g < dilation; ++g) {
              const Range r = group_indices(first, last, g, dilation);
              std::vector<int> tokens, expected;
              for (int j = r.begin; j < r.end; ++j) tokens.push_back(g + dilation * j);
              for (int t = first; t < last; ++t)
                if (t % dilation == g) expected.push_back(t);
              ASSERT_EQ(tokens, expected) << "length " << length << " dilation " << dilation << " box [" << first
                                          << ", " << last << ") group " << g;
              EXPECT_LE(r.size(), grid.per_group[2] << log2);
            }
          }
}

TEST(FusedPlan, TableEntriesAreValidTilings) {
  ASSERT_TRUE(wgmma_kernels_built()) << "this test is built with the sm_90a kernels in the table";
  for (DType dtype : {DType::kFloat16, DType::kFloat32})
  for (bool hopper : {false, true}) {
    for (int rank = 1; rank <= 3; ++rank)
      for (int head_dim : {32, 64, 128, 256}) {
        SCOPED_TRACE(std::string(name(dtype)) + " rank " + std::to_string(rank) + " head dim " + std::to_string(head_dim));
        const auto configs = candidate_configs(dtype, rank, head_dim, hopper);
        const bool float32 = dtype == DType::kFloat32;
        // float32 kernels stop at head dim 128 (shared memory; plan.cpp).
        ASSERT_EQ(configs.empty(), float32 && head_dim == 256);
        int wgmma = 0;
        for (const TileConfig& c : configs) wgmma += c.wgmma;
        EXPECT_EQ(wgmma > 0, !float32 && hopper && head_dim >= 64);
        for (const TileConfig& c : configs) {
          const TileShape& s = c.shape;
          SCOPED_TRACE(c.why);
          if (c.wgmma) EXPECT_TRUE(c.warps == 4 || c.warps == 8) << "a wgmma kernel has one or two consumer warpgroups";
          if (c.wgmma && head_dim == 256)
            EXPECT_TRUE(c.warps == 8 && c.block_kv == 64) << "head dim 256: the warp-specialized kernel, 64-key tiles";
          EXPECT_EQ(s.queries(), 16 * c.warps * c.m_tiles);
          if (c.halo) {
            EXPECT_FALSE(c.wgmma);
            EXPECT_FALSE(float32) << "the halo kernel is 16-bit";
            EXPECT_LE(head_dim, 64);
            EXPECT_EQ(c.block_kv, 0) << "the halo kernel has no key tiles";
            EXPECT_EQ(s.keys(), 1);
          } else {
            EXPECT_EQ(s.keys(), c.block_kv);
            EXPECT_GE(s.k_log2[2], 3) << "an 8-key chunk must be a run along the innermost axis";
          }
          int warp_rows = 1;
          for (int a = 0; a < kMaxRank; ++a) {
            EXPECT_LE(s.w_log2[a], s.q_log2[a]);
            warp_rows *= s.w(a);
            if (a < 3 - rank) EXPECT_EQ(s.q(a) * s.w(a) * s.k(a), 1) << "padded axis " << a << " must stay 1";
          }
          EXPECT_EQ(warp_rows, 16);
          // Rows cover the query box once; each warp's rows form its box.
          std::set<int> seen;
          for (int r = 0; r < s.queries(); ++r) {
            int off[kMaxRank], wo[kMaxRank];
            s.query_offset(r, off);
            s.warp_offset(r / 16, wo);  // the 16-query box of row r
            for (int a = 0; a < kMaxRank; ++a) {
              EXPECT_GE(off[a], wo[a]);
              EXPECT_LT(off[a], wo[a] + s.w(a));
            }
            seen.insert((off[0] * s.q(1) + off[1]) * s.q(2) + off[2]);
          }
          EXPECT_EQ(int(seen.size()), s.queries());
          if (c.halo) continue;
          seen.clear();
          for (int n = 0; n < s.keys(); ++n) {
            int off[kMaxRank];
            s.key_offset(n, off);
            for (int a = 0; a < kMaxRank; ++a) EXPECT_LT(off[a], s.k(a));
            if (n % 8) {  // an 8-key chunk is a run along the innermost axis
              int prev[kMaxRank];
              s.key_offset(n - 1, prev);
              EXPECT_EQ(off[2], prev[2] + 1);
            }
            seen.insert((off[0] * s.k(1) + off[1]) * s.k(2) + off[2]);
          }
          EXPECT_EQ(int(seen.size()), s.keys());
        }
      }
  }
}

Problem anchor(int rank, std::array<int64_t, 3> extent, std::array<int64_t, 3> kernel, int64_t dim) {
  Problem p;
  p.rank = rank;
  p.extent = extent;
  p.kernel = kernel;
  p.dim = dim;
  p.dtype = DType::kFloat16;
  return p;
}

TEST(FusedPlan, ChosenTilingsWasteLittle) {
  struct Expect {
    Problem p;
    double max_waste;  // pairs computed per pair needed, from tiling.md (+ margin)
  };
  const Expect cases[] = {
      {anchor(1, {32768, 0, 0}, {2048, 0, 0}, 128), 1.05},
      {anchor(2, {128, 128, 0}, {31, 31, 0}, 128), 1.40},
      {anchor(2, {256, 256, 0}, {80, 80, 0}, 128), 1.15},
      {anchor(3, {16, 48, 80}, {8, 16, 24}, 128), 1.50},
      {anchor(3, {30, 48, 80}, {18, 24, 24}, 128), 1.40},
  };
  for (const Expect& e : cases) {
    const auto ranked = rank_configs(e.p);
    ASSERT_FALSE(ranked.empty());
    EXPECT_GE(ranked.front().waste(), 1.0) << e.p.to_string();
    EXPECT_LE(ranked.front().waste(), e.max_waste) << e.p.to_string() << ": " << ranked.front().config.why;
  }
}

// On an sm_90 device the table offers both instruction paths; the estimate charges
// a wgmma kernel every pair of a visited key tile (no per-warp chunk skipping).
TEST(FusedPlan, WgmmaEstimateCountsWholeKeyTiles) {
  const Problem p = anchor(2, {128, 128, 0}, {31, 31, 0}, 128);
  for (const PlanEstimate& e : rank_configs(p, /*hopper=*/true)) {
    SCOPED_TRACE(e.config.why);
    if (e.config.wgmma) EXPECT_EQ(e.computed_pairs, e.visited_pairs);
    else EXPECT_LE(e.computed_pairs, e.visited_pairs);
    EXPECT_GE(e.waste(), 1.0);
  }
  const auto lines = describe_plan(p, /*hopper=*/true);
  // One line per candidate, then how the forward loads its tiles.
  ASSERT_EQ(lines.size(), candidate_configs(DType::kFloat16, 2, 128, true).size() + 1);
  EXPECT_EQ(lines.back().rfind("fused loads: cp.async (cp.async measured faster", 0), 0u) << lines.back();
  bool listed_wgmma = false;
  for (const std::string& line : lines) listed_wgmma |= line.find("(wgmma,") != std::string::npos;
  EXPECT_TRUE(listed_wgmma);
}

// With a query sub-box the planner estimates the box's own tiles (from its corner,
// with the windows of its queries), not the grid's: 1-D, 1000 tokens, causal window
// 7, box [500, 628): at most 8 tiles, so every one is sampled, and each of the 128
// queries needs 7 keys (the grid's first queries need fewer). A box that is the
// whole grid is estimated as the grid.
TEST(FusedPlan, AQuerySubBoxIsEstimatedOverItsOwnTiles) {
  Problem p = anchor(1, {1000, 0, 0}, {7, 0, 0}, 128);
  p.causal = {true, false, false};
  Problem box = p, whole = p;
  box.query_begin = {500, 0, 0};
  box.query_end = {628, 0, 0};
  whole.query_end = {1000, 0, 0};
  ASSERT_TRUE(box.validate().ok() && whole.validate().ok());
  for (const bool hopper : {false, true})
    for (const TileConfig& c : candidate_configs(DType::kFloat16, 1, 128, hopper)) {
      SCOPED_TRACE(c.why);
      EXPECT_EQ(estimate(box, c).needed_pairs, 128 * 7);
      EXPECT_EQ(estimate(whole, c).cost, estimate(p, c).cost);
      EXPECT_EQ(estimate(whole, c).needed_pairs, estimate(p, c).needed_pairs);
    }
}

// On an sm_90 device the planner picks the wgmma configuration measured fastest
// (H200 sweep of commit 2145f1f, docs/performance.md) on the compute-bound anchors.
TEST(FusedPlan, WgmmaChoicesMatchTheMeasuredBest) {
  struct Expect {
    Problem p;
    const char* chosen;  // the start of the table entry's reason
  };
  const Expect cases[] = {
      {anchor(1, {32768, 0, 0}, {2048, 0, 0}, 128), "wgmma-ws 1-D 128 queries"},
      {anchor(2, {128, 128, 0}, {31, 31, 0}, 128), "wgmma-ws 2-D 16x8 / keys 8x8"},
      {anchor(2, {256, 256, 0}, {80, 80, 0}, 128), "wgmma-ws 2-D 16x8 / keys 8x8"},
      {anchor(3, {16, 48, 80}, {8, 16, 24}, 128), "wgmma-ws 3-D 4x4x8 / keys 2x4x8"},
      {anchor(3, {30, 48, 80}, {18, 24, 24}, 128), "wgmma-ws 3-D 4x4x8 / keys 2x4x8"},
      // Head dim 64, small windows: the halo kernel (0.249 ms against the wgmma
      // one-warpgroup entry's 0.335, H100 2026-12-08 night).
      {anchor(2, {56, 56, 0}, {7, 7, 0}, 64), "halo 2-D 8x8"},
      {anchor(1, {4096, 0, 0}, {255, 0, 0}, 64), "wgmma 1-D 64 queries"},
  };
  for (const Expect& e : cases) {
    const auto ranked = rank_configs(e.p, /*hopper=*/true);
    ASSERT_FALSE(ranked.empty());
    EXPECT_EQ(std::string(ranked.front().config.why).rfind(e.chosen, 0), 0u)
        << e.p.to_string() << ": chose " << ranked.front().config.why;
  }
}

// float32 has one kernel per head dim (plan.cpp): 64-key tiles up to head dim 64,
// 32-key tiles at 128, none above; its chosen tilings still hug the windows.
TEST(FusedPlan, Float32RunsItsOwnKernels) {
  struct Expect {
    Problem p;
    int block_kv;
    double max_waste;
  };
  auto float32 = [](Problem p) {
    p.dtype = DType::kFloat32;
    return p;
  };
  const Expect cases[] = {
      // NAT: a 4x4 warp box's 7x7 windows span 10 x 16 keys in 8-key chunks (3.01x,
      // as the 16-bit plan).
      {float32(anchor(2, {56, 56, 0}, {7, 7, 0}, 32)), 64, 3.05},
      {float32(anchor(1, {4096, 0, 0}, {255, 0, 0}, 64)), 64, 1.3},
      {float32(anchor(1, {32768, 0, 0}, {2048, 0, 0}, 128)), 32, 1.05},
      {float32(anchor(2, {128, 128, 0}, {31, 31, 0}, 128)), 32, 1.40},
      {float32(anchor(3, {16, 48, 80}, {8, 16, 24}, 128)), 32, 1.50},
  };
  for (const Expect& e : cases) {
    SCOPED_TRACE(e.p.to_string());
    const auto ranked = rank_configs(e.p, /*hopper=*/true);
    ASSERT_FALSE(ranked.empty());
    for (const PlanEstimate& r : ranked) {
      EXPECT_FALSE(r.config.wgmma);
      EXPECT_EQ(r.config.warps, 4);
      EXPECT_EQ(r.config.block_kv, e.block_kv);
    }
    EXPECT_LE(ranked.front().waste(), e.max_waste) << ranked.front().config.why;
  }
  const auto lines = describe_plan(float32(anchor(1, {4096, 0, 0}, {255, 0, 0}, 256)));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines.front().find("no float32 kernel for head dim 256"), std::string::npos) << lines.front();
}

TEST(FusedPlan, DryRunListsEveryCandidateChosenFirst) {
  const auto lines = describe_plan(anchor(2, {56, 56, 0}, {7, 7, 0}, 32));
  ASSERT_EQ(lines.size(), candidate_configs(DType::kFloat16, 2, 32).size() + 1);
  EXPECT_NE(lines.front().find("CHOSEN"), std::string::npos);
  for (size_t i = 1; i + 1 < lines.size(); ++i) EXPECT_NE(lines[i].find("rejected"), std::string::npos);
  // The mma.sync kernels have no TMA producer: the last line says so.
  EXPECT_NE(lines.back().find("fused loads: cp.async ("), std::string::npos) << lines.back();
  EXPECT_NE(describe_plan(anchor(1, {64, 0, 0}, {3, 0, 0}, 512)).front().find("no head-dim bucket"), std::string::npos);
}

// A periodic axis: --dry-run counts the query tiles whose key box wraps (a 7-wide
// window reaches past both ends of a 56-token axis: the first and the last tile).
TEST(FusedPlan, DryRunCountsTheWrappingKeyBoxes) {
  Problem p = anchor(2, {56, 56, 0}, {7, 7, 0}, 128);  // head dim 128: a tiled plan (no halo kernel)
  p.periodic = {false, true, false};
  const auto lines = describe_plan(p);
  std::string periodic;
  for (const std::string& line : lines)
    if (line.rfind("fused periodic:", 0) == 0) periodic = line;
  EXPECT_NE(periodic.find("axis 1: 2 of "), std::string::npos) << periodic;
  EXPECT_NE(periodic.find("the backward's query and key tiles at the seam likewise"), std::string::npos) << periodic;
  EXPECT_EQ(periodic.find("axis 0"), std::string::npos) << periodic;
  // And what they cost the plan: its key tiles against the same problem's without
  // periodic axes, and the wrapping ones (key_tile_count, checked tile by tile above).
  std::string cost;
  for (const std::string& line : lines)
    if (line.rfind("fused periodic cost:", 0) == 0) cost = line;
  EXPECT_NE(cost.find("over the problem without periodic axes"), std::string::npos) << cost;
  EXPECT_EQ(cost.find(", 0 of them wrap"), std::string::npos) << cost;
  // The halo kernel has no seam tiles: its line says so.
  Problem small = p;
  small.dim = 32;
  std::string halo;
  for (const std::string& line : describe_plan(small))
    if (line.rfind("fused periodic:", 0) == 0) halo = line;
  EXPECT_NE(halo.find("no seam tiles"), std::string::npos) << halo;
}

// key_tile_count (--dry-run's "periodic cost" line) against a count tile by tile, on
// small 2-D grids with periodic, causal and plain axes, dilation and stride.
TEST(FusedPlan, KeyTileCountMatchesATileByTileCount) {
  std::mt19937 rng(5);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 300; ++trial) {
    Problem p = anchor(2, {uniform(1, 40), uniform(1, 40), 0}, {1, 1, 0}, 32);
    for (int a = 0; a < 2; ++a) {
      p.kernel[a] = uniform(1, int(p.extent[a]));
      p.dilation[a] = uniform(1, int(p.extent[a] / p.kernel[a]));
      p.stride[a] = uniform(1, int(p.kernel[a]));
      p.causal[a] = uniform(0, 3) == 0;
      p.periodic[a] = !p.causal[a] && uniform(0, 1) == 1;
    }
    const TileShape s = log2_shape(0, uniform(0, 4), uniform(0, 4), 0, 0, 0, 0, uniform(0, 3), uniform(0, 4));
    const Neighborhood nb = p.neighborhood();
    const Axis &a1 = nb.axis[1], &a2 = nb.axis[2];
    const int lg1 = a1.group_length(0), lg2 = a2.group_length(0);
    double loaded = 0, wrapped = 0;
    for (int t1 = 0; t1 < lg1; t1 += s.q(1))
      for (int t2 = 0; t2 < lg2; t2 += s.q(2)) {
        const Range k1 = a1.window_union({t1, std::min(t1 + s.q(1), lg1)}, lg1);
        const Range k2 = a2.window_union({t2, std::min(t2 + s.q(2), lg2)}, lg2);
        for (int o1 = k1.begin; o1 < k1.end; o1 += s.k(1))
          for (int o2 = k2.begin; o2 < k2.end; o2 += s.k(2)) {
            ++loaded;
            wrapped += (a1.periodic && (o1 < 0 || o1 + s.k(1) > lg1)) || (a2.periodic && (o2 < 0 || o2 + s.k(2) > lg2));
          }
      }
    const KeyTileCount c = key_tile_count(p, s);
    ASSERT_EQ(c.loaded, loaded) << p.to_string();
    ASSERT_EQ(c.wrapped, wrapped) << p.to_string();
  }
}

// The halo kernel sizes its shared memory by halo_rows_bound: per axis, no run of q
// queries (from any first query: tiles start anywhere in a query sub-box) has a window
// union longer than the bound, for every dilation group; and the bound is reached.
TEST(FusedPlan, HaloRowsBoundHoldsEveryKeyBox) {
  for (int length = 1; length <= 30; ++length)
    for (int kernel = 1; kernel <= length; ++kernel)
      for (int dilation = 1; kernel * dilation <= length; ++dilation)
        for (int stride = 1; stride <= kernel; ++stride)
          for (int mode = 0; mode < 3; ++mode)  // plain, causal, periodic
            for (int log2 = 0; log2 <= 4; ++log2) {
              Problem p = anchor(1, {length, 0, 0}, {kernel, 0, 0}, 32);
              p.dilation = {dilation, 1, 1};
              p.stride = {stride, 1, 1};
              p.causal = {mode == 1, false, false};
              p.periodic = {mode == 2, false, false};
              const TileShape s = log2_shape(0, 0, log2, 0, 0, 0, 0, 0, 0);
              const int bound = halo_rows_bound(p, s);
              const Axis ax = p.neighborhood().axis[2];
              int longest = 0;
              for (int g = 0; g < dilation; ++g) {
                const int lg = ax.group_length(g);
                for (int first = 0; first < lg; ++first) {
                  const Range keys = ax.window_union({first, std::min(first + s.q(2), lg)}, lg);
                  longest = std::max(longest, keys.size());
                }
              }
              ASSERT_LE(longest, bound) << p.to_string() << " tile " << s.q(2);
              // Tight where neither the group's length nor a short tile caps it.
              if (mode == 0 && stride == 1 && s.q(2) + kernel - 1 <= ax.group_length(0))
                EXPECT_EQ(longest, bound) << p.to_string() << " tile " << s.q(2);
            }
}

// The halo entries win where they were measured faster (rank 1-2, windows <= 13:
// NAT's 56² k7 at head dim 32 takes the 8-warp entry, at 64 the 4-warp one), and
// elsewhere run only when forced; --dry-run says why each is refused.
TEST(FusedPlan, HaloEntriesWinSmallWindows) {
  const Problem nat = anchor(2, {56, 56, 0}, {7, 7, 0}, 32);
  const auto ranked = rank_configs(nat);
  ASSERT_TRUE(ranked.front().config.halo);
  EXPECT_EQ(ranked.front().config.warps, 8);
  EXPECT_EQ(rank_configs(anchor(2, {56, 56, 0}, {7, 7, 0}, 64)).front().config.warps, 4);
  EXPECT_TRUE(rank_configs(anchor(1, {4096, 0, 0}, {13, 0, 0}, 64)).front().config.halo);
  int halo = 0;
  for (const PlanEstimate& e : ranked) {
    if (!e.config.halo) continue;
    ++halo;
    EXPECT_TRUE(e.refused.empty()) << e.refused;
    EXPECT_TRUE(halo_refusal(nat, e.config).empty()) << e.config.why;
    EXPECT_GE(e.waste(), 1.0);
  }
  EXPECT_EQ(halo, 2) << "two 2-D halo entries at head dim 32";
  // Measured a tie (3-D k5) or not measured (windows over 13, float32): tiled.
  for (const Problem& other : {anchor(3, {16, 32, 32}, {5, 5, 5}, 32), anchor(2, {128, 128, 0}, {15, 15, 0}, 32)}) {
    const auto list = rank_configs(other);
    EXPECT_FALSE(list.front().config.halo) << other.to_string();
    for (const PlanEstimate& e : list)
      if (e.config.halo) EXPECT_FALSE(e.refused.empty()) << other.to_string();
  }
  Problem nat32 = nat;
  nat32.dtype = DType::kFloat32;
  EXPECT_FALSE(halo_by_default(nat32));
  Problem with_tokens = nat;
  with_tokens.additional_tokens = 4;
  Problem wide = nat;
  wide.extent = {256, 256, 0};
  wide.kernel = {63, 63, 0};
  for (const TileConfig& c : candidate_configs(DType::kFloat16, 2, 32)) {
    if (!c.halo) continue;
    EXPECT_NE(halo_refusal(with_tokens, c).find("additional tokens"), std::string::npos);
    EXPECT_NE(halo_refusal(wide, c).find("bytes of shared memory"), std::string::npos) << halo_refusal(wide, c);
  }
  EXPECT_NE(describe_plan(anchor(3, {16, 32, 32}, {5, 5, 5}, 32)).front().find("CHOSEN"), std::string::npos);
  EXPECT_NE(describe_plan(nat).front().find("(halo, warps 8"), std::string::npos) << describe_plan(nat).front();
}

}  // namespace
}  // namespace nbhd::cuda::fused
