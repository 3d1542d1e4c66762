// SPDX-License-Identifier: Apache-2.0
// The fused backward's host-side geometry and planner, on the CPU: candidate tiles,
// the row numbering of GridTile, the key pass's query walk (query_tile) against a
// stateful walk, the d rpb span of a key tile against brute force, and the key
// pass's waste estimate on the anchor problems.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "cuda/fused/backward_params.hpp"
#include "cuda/fused/backward_plan.hpp"

namespace nbhd::cuda::fused {
namespace {

TEST(FusedBackwardPlan, CandidatesAreCompiledShapes) {
  for (DType dtype : {DType::kFloat16, DType::kFloat32})
    for (int rank = 1; rank <= 3; ++rank) {
      for (int head_dim : {32, 64, 128}) {
        const auto c = backward_candidates(dtype, rank, head_dim);
        ASSERT_FALSE(c.empty()) << name(dtype) << " rank " << rank << " head dim " << head_dim;
        // float32 at head dim 128: 32-column tiles (shared memory; backward_plan.hpp).
        const int cols = dtype == DType::kFloat32 && head_dim == 128 ? 32 : 64;
        EXPECT_EQ(backward_cols(dtype, head_dim), cols);
        for (const TileConfig& t : c) {
          EXPECT_EQ(t.warps, kBackwardWarps);
          EXPECT_EQ(t.block_kv, cols);
          EXPECT_EQ(t.m_tiles, 1);
          EXPECT_FALSE(t.wgmma);
          EXPECT_EQ(t.shape.queries(), 16 * kBackwardWarps);
          EXPECT_EQ(t.shape.keys(), cols);
        }
      }
      EXPECT_TRUE(backward_candidates(dtype, rank, 256).empty()) << "head dim 256 has no backward kernel";
    }
}

// On Hopper the wgmma key pass's entries follow the mma.sync ones: 16-bit, head dims
// 64 and 128, two warpgroups of 64 keys (128 rows, 8 warps) x 64-query tiles.
TEST(FusedBackwardPlan, WgmmaCandidatesOnHopper) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32})
    for (int rank = 1; rank <= 3; ++rank)
      for (int head_dim : {32, 64, 128}) {
        SCOPED_TRACE(std::string(name(dtype)) + " rank " + std::to_string(rank) + " head dim " + std::to_string(head_dim));
        const auto plain = backward_candidates(dtype, rank, head_dim);
        const auto hopper = backward_candidates(dtype, rank, head_dim, /*hopper=*/true);
        ASSERT_GE(hopper.size(), plain.size());
        for (size_t i = 0; i < plain.size(); ++i) EXPECT_STREQ(hopper[i].why, plain[i].why) << "indices keep their meaning";
        const bool expected = dtype != DType::kFloat32 && head_dim != 32;
        EXPECT_EQ(hopper.size() > plain.size(), expected);
        for (size_t i = plain.size(); i < hopper.size(); ++i) {
          const TileConfig& c = hopper[i];
          EXPECT_TRUE(c.wgmma);
          EXPECT_EQ(c.warps, 8);
          EXPECT_EQ(c.shape.queries(), 128);  // keys per CTA
          EXPECT_EQ(c.shape.keys(), 64);      // queries per tile
          EXPECT_GE(c.shape.k_log2[2], 3) << "8-query chunks must be runs along the innermost axis";
        }
      }
}

// The planner takes the wgmma key pass for the key pass where it runs the problem
// (rpb and d rpb at head dim 64 and rank 2 or 3 only), never for the dq pass; the deterministic
// mode's d rpb is the mma.sync key pass's (fixed-order sums); --dry-run says both.
TEST(FusedBackwardPlan, WgmmaKeyPassWhereItRuns) {
  Problem p;
  p.rank = 1;
  p.extent = {4096, 1, 1};
  p.kernel = {255, 1, 1};
  p.heads = 2;
  p.dim = 128;
  p.dtype = DType::kFloat16;
  BackwardPlan plan = plan_backward(p, /*hopper=*/true);
  EXPECT_TRUE(plan.key_pass.wgmma);
  EXPECT_FALSE(plan.dq_pass.wgmma);
  EXPECT_FALSE(plan_backward(p).key_pass.wgmma);
  auto says = [](const Problem& q, const char* what) {
    bool said = false;
    for (const std::string& line : describe_backward_plan(q, /*hopper=*/true)) said |= line.find(what) != std::string::npos;
    return said;
  };
  // Head dim 128: d rpb (asked for with or without an rpb) stays on mma.sync.
  EXPECT_TRUE(wgmma_key_pass_refusal(p, /*d_rpb=*/false, /*deterministic=*/true).empty());
  EXPECT_FALSE(wgmma_key_pass_refusal(p, /*d_rpb=*/true, /*deterministic=*/false).empty());
  p.has_rpb = true;
  EXPECT_FALSE(plan_backward(p, /*hopper=*/true).key_pass.wgmma);
  EXPECT_TRUE(says(p, "no wgmma key pass: rpb at head dim 128"));
  // Head dim 64, 1-D: rpb stays on mma.sync (measured faster there).
  p.dim = 64;
  EXPECT_FALSE(plan_backward(p, /*hopper=*/true).key_pass.wgmma);
  EXPECT_TRUE(says(p, "no wgmma key pass: rpb on a 1-D problem"));
  // Head dim 64, 2-D: the wgmma key pass with rpb and d rpb, but not deterministic d rpb.
  p.rank = 2;
  p.extent = {64, 64, 1};
  p.kernel = {15, 15, 1};
  EXPECT_TRUE(wgmma_key_pass_refusal(p, /*d_rpb=*/true, /*deterministic=*/false).empty());
  EXPECT_FALSE(wgmma_key_pass_refusal(p, /*d_rpb=*/true, /*deterministic=*/true).empty());
  EXPECT_TRUE(plan_backward(p, /*hopper=*/true).key_pass.wgmma);
  EXPECT_TRUE(says(p, "with Options::deterministic, the mma.sync key pass instead"));
}

// The wgmma key pass's d rpb bins (RpbBins): each warpgroup's 64 keys are a box of
// the CTA tile (so a key's bin part is affine in its offsets), both boxes have the
// same extents (the columns' parts are shared), and every entry's bins fit the
// kernel's shared memory.
TEST(FusedBackwardPlan, WgmmaRpbBinsFit) {
  int largest = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int head_dim : {64, 128})
      for (const TileConfig& c : backward_candidates(DType::kFloat16, rank, head_dim, /*hopper=*/true)) {
        if (!c.wgmma) continue;
        const GridTile s = GridTile::from(c.shape);
        const RpbBins b0 = RpbBins::of(s, 0), b1 = RpbBins::of(s, 1);
        for (int wg = 0; wg < 2; ++wg) {
          const RpbBins& b = wg ? b1 : b0;
          int volume = 1;
          for (int a = 0; a < kMaxRank; ++a) volume *= b.extent[a] - s.col(a) + 1;
          EXPECT_EQ(volume, 64) << "rank " << rank << ": warpgroup " << wg << "'s keys are not a box";
          std::set<int> bins;
          for (int r = 64 * wg; r < 64 * wg + 64; ++r) {
            int off[kMaxRank];
            s.row_offset(r, off);
            for (int a = 0; a < kMaxRank; ++a) {
              EXPECT_GE(off[a], b.first[a]);
              EXPECT_LT(off[a], b.first[a] + b.extent[a] - s.col(a) + 1);
            }
            for (int n = 0; n < s.cols(); ++n) {
              int c_off[kMaxRank];
              s.col_offset(n, c_off);
              const int bin = b.row_part(s, off) - b.col_part(c_off);
              EXPECT_GE(bin, 0);
              EXPECT_LT(bin, b.count());
              int expected = 0;  // row-major over (key - first - query + col - 1) per axis
              for (int a = 0; a < kMaxRank; ++a) expected = expected * b.extent[a] + off[a] - b.first[a] - c_off[a] + s.col(a) - 1;
              EXPECT_EQ(bin, expected);
            }
          }
        }
        for (int a = 0; a < kMaxRank; ++a) EXPECT_EQ(b0.extent[a], b1.extent[a]);
        EXPECT_LE(b0.count(), RpbBins::kCapacity);
        largest = std::max(largest, b0.count());
      }
  EXPECT_GT(largest, RpbBins::kCapacity / 2) << "the capacity is far above what the table needs";
}

TEST(FusedBackwardPlan, RowNumberingIsABijection) {
  for (int rank = 1; rank <= 3; ++rank)
    for (const TileConfig& c : backward_candidates(DType::kFloat16, rank, 64)) {
      const GridTile g = GridTile::from(c.shape);
      SCOPED_TRACE(c.why);
      std::set<int> seen;
      for (int r = 0; r < g.rows(); ++r) {
        int off[kMaxRank], wo[kMaxRank];
        g.row_offset(r, off);
        g.warp_offset(r / 16, wo);
        for (int a = 0; a < kMaxRank; ++a) {
          EXPECT_GE(off[a], wo[a]);
          EXPECT_LT(off[a], wo[a] + g.warp(a));
        }
        EXPECT_EQ(g.row_of(off), r);
        seen.insert((off[0] * g.row(1) + off[1]) * g.row(2) + off[2]);
      }
      EXPECT_EQ(int(seen.size()), g.rows());
      EXPECT_EQ(g.cols(), backward_cols(DType::kFloat16, 64));
      EXPECT_GE(g.col_log2[2], 3) << "8-query chunks must be runs along the innermost axis";
    }
}

Axis random_axis(std::mt19937_64& rng, int max_length) {
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Axis ax;
  ax.length = uniform(1, max_length);
  ax.kernel = uniform(1, ax.length);
  ax.dilation = uniform(1, ax.length / ax.kernel);
  ax.stride = uniform(1, ax.kernel);
  ax.causal = uniform(0, 3) == 0;
  return ax;
}

// query_tile(it) walks the same tiles, in the same order, as an odometer over heads,
// then axes 0..2 (innermost last), each axis over its groups in order: one group's
// box, or every group's part of the tokens [first, last) (a query sub-box, or the
// axis), groups from the first token's.
TEST(FusedBackwardPlan, QueryWalkMatchesAStatefulWalk) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 400; ++trial) {
    Neighborhood nb;
    GridTile shape{{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
    for (int a = 0; a < kMaxRank; ++a) {
      nb.axis[a] = random_axis(rng, a == 2 ? 90 : 20);
      shape.col_log2[a] = std::uniform_int_distribution<int>(a == 2 ? 3 : 0, a == 2 ? 5 : 2)(rng);
    }
    const bool all_groups = trial % 2 == 0;
    WalkAxis walk[kMaxRank];
    int group[kMaxRank];
    Range box[kMaxRank], tokens[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = nb.axis[a];
      group[a] = std::uniform_int_distribution<int>(0, ax.dilation - 1)(rng);
      const int lg = ax.group_length(group[a]);
      const int b = std::uniform_int_distribution<int>(0, lg - 1)(rng);
      box[a] = {b, std::uniform_int_distribution<int>(b + 1, lg)(rng)};
      tokens[a] = {0, ax.length};
      if (trial % 4 == 2) {
        tokens[a].begin = std::uniform_int_distribution<int>(0, ax.length - 1)(rng);
        tokens[a].end = std::uniform_int_distribution<int>(tokens[a].begin + 1, ax.length)(rng);
      }
      walk[a] = all_groups ? WalkAxis{tokens[a].begin, tokens[a].end,
                                      all_groups_tiles(ax, shape.col(a), tokens[a].begin, tokens[a].end), -1}
                           : WalkAxis{box[a].begin, box[a].end, ceil_div(box[a].size(), shape.col(a)), group[a]};
    }
    // The stateful walk, per axis a list of (group, origin, end).
    struct Step {
      int group, origin, end;
    };
    std::vector<Step> steps[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = nb.axis[a];
      for (int k = 0; k < ax.dilation; ++k) {
        const int g = all_groups ? (tokens[a].begin + k) % ax.dilation : k;
        if (!all_groups && g != group[a]) continue;
        Range r = box[a];
        if (all_groups) {  // group g's tokens in [begin, end), by brute force
          r = {ax.length, 0};
          for (int t = tokens[a].begin; t < tokens[a].end; ++t)
            if (t % ax.dilation == g) r = {std::min(r.begin, t / ax.dilation), t / ax.dilation + 1};
        }
        for (int o = r.begin; o < r.end; o += shape.col(a)) steps[a].push_back({g, o, r.end});
      }
      ASSERT_EQ(int(steps[a].size()), walk[a].tiles) << "axis " << a;
    }
    const int heads = 3;
    int it = 0;
    for (int h = 0; h < heads; ++h)
      for (const Step& s0 : steps[0])
        for (const Step& s1 : steps[1])
          for (const Step& s2 : steps[2]) {
            const QueryTile t = query_tile(nb, shape, walk, it++);
            const Step s[kMaxRank] = {s0, s1, s2};
            ASSERT_EQ(t.head, h);
            for (int a = 0; a < kMaxRank; ++a) {
              ASSERT_EQ(t.group[a], s[a].group) << "tile " << it - 1 << " axis " << a;
              ASSERT_EQ(t.origin[a], s[a].origin) << "tile " << it - 1 << " axis " << a;
              ASSERT_EQ(t.end[a], s[a].end) << "tile " << it - 1 << " axis " << a;
            }
          }
  }
}

// The span of bias indices of a key tile holds every index its (key, query) neighbor
// pairs use (found by brute force over the windows) and stays in [0, 2 * kernel - 1).
// It may be wider: it pairs the box's last key with its first query, which need not
// be neighbors; the extra indices get zero sums.
TEST(FusedBackwardPlan, RpbSpanOfAKeyTileHoldsItsPairs) {
  std::mt19937_64 rng(12);
  for (int trial = 0; trial < 300; ++trial) {
    const Axis ax = random_axis(rng, 60);
    const int extent = 1 << std::uniform_int_distribution<int>(0, 4)(rng);
    for (int g = 0; g < ax.dilation; ++g) {
      const int lg = ax.group_length(g);
      for (int origin = 0; origin < lg; origin += extent) {
        int lo = 1 << 30, hi = -1;
        for (int jq = 0; jq < lg; ++jq) {
          const Range w = ax.window(jq, lg);
          for (int jk = std::max(origin, w.begin); jk < std::min({origin + extent, lg, w.end}); ++jk) {
            lo = std::min(lo, jk - jq + ax.kernel - 1);
            hi = std::max(hi, jk - jq + ax.kernel - 1);
          }
        }
        const Range span = key_tile_rpb_span(ax, lg, origin, extent);
        SCOPED_TRACE("length " + std::to_string(ax.length) + " kernel " + std::to_string(ax.kernel) + " dilation " +
                     std::to_string(ax.dilation) + " stride " + std::to_string(ax.stride) + " causal " +
                     std::to_string(ax.causal) + " origin " + std::to_string(origin));
        ASSERT_GE(hi, lo) << "every key has a query";
        ASSERT_LE(span.begin, lo);
        ASSERT_GE(span.end, hi + 1);
        ASSERT_GE(span.begin, 0);
        ASSERT_LE(span.end, 2 * ax.kernel - 1);
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

// The key pass computes about as few wasted pairs as the forward: the inverse
// neighborhood of a key tile is as compact as the neighborhood of a query tile.
TEST(FusedBackwardPlan, KeyPassWastesLittle) {
  struct Expect {
    Problem p;
    double max_waste;  // pairs computed per pair needed (the forward's bound + margin)
  };
  const Expect cases[] = {
      {anchor(1, {32768, 0, 0}, {2048, 0, 0}, 128), 1.06},
      {anchor(2, {128, 128, 0}, {31, 31, 0}, 128), 1.45},
      {anchor(2, {56, 56, 0}, {7, 7, 0}, 32), 3.3},
      {anchor(3, {16, 48, 80}, {8, 16, 24}, 128), 1.6},
  };
  for (const Expect& e : cases) {
    SCOPED_TRACE(e.p.to_string());
    const BackwardPlan plan = plan_backward(e.p);
    const PlanEstimate key = estimate_key_pass(e.p, plan.key_pass);
    EXPECT_GE(key.waste(), 1.0);
    EXPECT_LE(key.waste(), e.max_waste);
    EXPECT_GT(key.needed_pairs, 0);
    for (const std::string& line : describe_backward_plan(e.p)) EXPECT_FALSE(line.empty());
  }
}

// On Hopper the key pass the planner takes is the one measured faster on the first
// sweep of the wgmma key pass (H200, bench/results/hopper-backward-h200-2026-12-06):
// wgmma 2.0-2.2x faster everywhere but 1-D at head dim 64 (1.57x) and 56² k7 at
// head dim 64, where mma.sync was 3% faster.
TEST(FusedBackwardPlan, WgmmaChoicesMatchTheMeasuredFaster) {
  auto with = [](Problem p, std::array<int64_t, 3> stride, bool causal) {
    p.stride = stride;
    p.causal = {causal, false, false};
    return p;
  };
  struct Expect {
    Problem p;
    bool wgmma;
  };
  const Expect cases[] = {
      {anchor(1, {32768, 1, 1}, {2048, 1, 1}, 128), true},
      {with(anchor(1, {32768, 1, 1}, {2048, 1, 1}, 128), {1, 1, 1}, true), true},
      {with(anchor(1, {32768, 1, 1}, {2048, 1, 1}, 128), {2048, 1, 1}, false), true},
      {anchor(1, {32768, 1, 1}, {2048, 1, 1}, 64), true},
      {anchor(2, {128, 128, 1}, {31, 31, 1}, 128), true},
      {anchor(2, {128, 128, 1}, {63, 63, 1}, 128), true},
      {anchor(3, {16, 48, 80}, {8, 16, 24}, 128), true},
      {anchor(3, {16, 48, 80}, {16, 24, 40}, 128), true},
      {with(anchor(2, {256, 256, 1}, {80, 80, 1}, 128), {16, 16, 1}, false), true},
      {anchor(2, {56, 56, 1}, {7, 7, 1}, 64), false},
  };
  for (const Expect& e : cases) {
    SCOPED_TRACE(e.p.to_string());
    EXPECT_EQ(plan_backward(e.p, /*hopper=*/true).key_pass.wgmma, e.wgmma);
  }
}

// Needed pairs counted from the keys' side equal those from the queries' side
// (every pair is one query in one key's inverse window).
TEST(FusedBackwardPlan, KeyPassCountsTheSamePairs) {
  Problem p = anchor(2, {24, 40, 0}, {5, 9, 0}, 64);
  p.stride = {2, 3, 1};
  p.causal = {false, true, false};
  for (const TileConfig& c : backward_candidates(DType::kFloat16, 2, 64, /*hopper=*/true)) {
    // Whole-grid counts: the estimate samples up to 8 tiles per axis, so use a grid
    // of at most 8 key tiles per axis.
    const PlanEstimate k = estimate_key_pass(p, c), f = estimate(p, c);
    int64_t pairs = 0;
    const Neighborhood nb = p.neighborhood();
    for (int j1 = 0; j1 < 24; ++j1)
      for (int j2 = 0; j2 < 40; ++j2)
        pairs += int64_t(nb.axis[1].window(j1, 24).size()) * nb.axis[2].window(j2, 40).size();
    EXPECT_DOUBLE_EQ(k.needed_pairs, double(pairs)) << c.why;
    EXPECT_DOUBLE_EQ(f.needed_pairs, double(pairs)) << c.why;
  }
}

}  // namespace
}  // namespace nbhd::cuda::fused
