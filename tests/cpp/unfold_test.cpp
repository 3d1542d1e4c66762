// SPDX-License-Identifier: Apache-2.0
// Short dilation groups unfolded into an extra axis (core/unfold.hpp): which problems
// are unfolded into which parts, and that running the parts over strided views of
// the tensors computes the original problem exactly. The parts run on the reference
// backend through the public API (so each part problem and each view also passes
// validation and the tensor checks) and are compared with the dense-mask oracle.
//
// Tolerance: float64 on both sides, 1e-10 absolute on O(1) values (summation order
// differs, ~1e-15 per term), as in cpu_backends_test.cpp.
#include <gtest/gtest.h>

#include "core/unfold.hpp"
#include "testing.hpp"

namespace nbhd {
namespace {

using detail::UnfoldedPart;
using testing::DenseResult;
using testing::HostTensor;
using testing::Inputs;

Problem one_axis(int64_t L, int64_t k, int64_t d) {
  Problem p;
  p.rank = 1;
  p.extent = {L, 1, 1};
  p.kernel = {k, 1, 1};
  p.dilation = {d, 1, 1};
  p.dim = 8;
  return p;
}

TEST(UnfoldShortGroups, OneAxisWithUnequalGroupsGivesTwoParts) {
  // 2048 = 3 * 520 + 488: groups 0..487 hold 4 tokens, groups 488..519 hold 3.
  const Problem p = one_axis(2048, 3, 520);
  const std::vector<UnfoldedPart> parts = detail::unfold_short_groups(p, false);
  ASSERT_EQ(parts.size(), 2u);
  for (const UnfoldedPart& part : parts) {
    EXPECT_EQ(part.problem.rank, 2);
    EXPECT_EQ(part.problem.kernel[0], 3);
    EXPECT_EQ(part.problem.kernel[1], 1);
    EXPECT_EQ(part.problem.dilation[0], 1);
    EXPECT_TRUE(part.problem.validate().ok()) << part.problem.validate().message();
  }
  EXPECT_EQ(parts[0].problem.extent[0], 4);
  EXPECT_EQ(parts[0].problem.extent[1], 488);
  EXPECT_EQ(parts[0].first_group[0], 0);
  EXPECT_EQ(parts[1].problem.extent[0], 3);
  EXPECT_EQ(parts[1].problem.extent[1], 32);
  EXPECT_EQ(parts[1].first_group[0], 488);
  // Gradients that sum over all queries need one part: none here.
  EXPECT_TRUE(detail::unfold_short_groups(p, true).empty());
}

TEST(UnfoldShortGroups, EqualGroupsGiveOnePart) {
  const std::vector<UnfoldedPart> parts = detail::unfold_short_groups(one_axis(60, 3, 4), true);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].problem.extent[0], 15);
  EXPECT_EQ(parts[0].problem.extent[1], 4);
}

TEST(UnfoldShortGroups, LongGroupsAndFullRanksStayAsTheyAre) {
  EXPECT_TRUE(detail::unfold_short_groups(one_axis(64, 3, 4), false).empty());  // groups of 16
  EXPECT_TRUE(detail::unfold_short_groups(one_axis(64, 3, 1), false).empty());  // no dilation
  Problem p3 = one_axis(40, 3, 8);
  p3.rank = 3;
  p3.extent = {40, 40, 40};
  p3.kernel = {3, 3, 3};
  p3.dilation = {8, 8, 8};
  EXPECT_TRUE(detail::unfold_short_groups(p3, false).empty());  // no room for a fourth axis
}

TEST(UnfoldShortGroups, ShortestGroupsGoFirstWhenTheRankHasRoomForOne) {
  Problem p = one_axis(24, 3, 4);  // groups of 6
  p.rank = 2;
  p.extent = {24, 36, 1};
  p.kernel = {3, 3, 1};
  p.dilation = {4, 9, 1};  // groups of 4 on axis 1: 24 tokens per group
  const std::vector<UnfoldedPart> parts = detail::unfold_short_groups(p, false);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_FALSE(parts[0].unfolded[0]);
  EXPECT_TRUE(parts[0].unfolded[1]);
  EXPECT_EQ(parts[0].problem.rank, 3);
  EXPECT_EQ(parts[0].problem.extent[0], 24);
  EXPECT_EQ(parts[0].problem.dilation[0], 4);
  EXPECT_EQ(parts[0].problem.extent[1], 4);
  EXPECT_EQ(parts[0].problem.extent[2], 9);
}

TEST(UnfoldShortGroups, GroupsThatFillATileStayAsTheyAre) {
  Problem p = one_axis(56, 7, 8);  // DiNAT: 56x56, window 7, dilation 8: 7x7 groups
  p.rank = 2;
  p.extent = {56, 56, 1};
  p.kernel = {7, 7, 1};
  p.dilation = {8, 8, 1};
  EXPECT_TRUE(detail::unfold_short_groups(p, false).empty());
  p.extent = {28, 28, 1};  // 4x4 groups
  p.kernel = {3, 3, 1};
  p.dilation = {9, 9, 1};
  EXPECT_EQ(detail::unfold_short_groups(p, false).size(), 2u);
}

// A random valid problem whose axis 0 has dilation groups short enough to be
// unfolded, equal or not (under 16 tokens; under 8 beside a second axis of at most 4
// tokens, so that a group stays under kSmallGroup); the other axes as
// testing::random_problem makes them.
Problem short_group_problem(std::mt19937_64& rng, int rank) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  testing::RandomOptions o{rank, DType::kFloat64};
  o.max_extent = rank == 1 ? 0 : 4;
  Problem p = testing::random_problem(rng, o);
  const int64_t longest = rank == 1 ? detail::kShortGroup - 1 : 7;
  const int64_t k = uniform(1, 4), L = uniform(2 * k + 4, 80);
  const int64_t d = uniform(std::max<int64_t>(2, L / longest + 1), L / k);
  p.extent[0] = L, p.kernel[0] = k, p.dilation[0] = d;
  p.stride[0] = uniform(1, k);
  p.causal[0] = uniform(0, 2) == 0;
  return p;
}

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }

struct PartsResult {
  HostTensor out, lse, dq, dk, dv, drpb, dak, dav;
};

// Forward, then backward with d_out, of every part on the reference backend.
PartsResult run_parts(const Problem& p, const std::vector<UnfoldedPart>& parts, const Inputs& in, const HostTensor& d_out) {
  std::vector<int64_t> out_shape = shape_of(in.q.ref()), lse_shape = out_shape;
  out_shape.back() = p.value_dim();
  lse_shape.pop_back();
  PartsResult r{HostTensor(p.dtype, out_shape), HostTensor(accumulator_dtype(p.dtype), lse_shape), HostTensor(p.dtype, shape_of(in.q.ref())),
        HostTensor(p.dtype, shape_of(in.k.ref())), HostTensor(p.dtype, shape_of(in.v.ref()))};
  ForwardTensors f;
  f.query = in.q.ref(), f.key = in.k.ref(), f.value = in.v.ref(), f.rpb = in.rpb.ref();
  f.additional_keys = in.ak.ref(), f.additional_values = in.av.ref();
  f.out = r.out.ref(), f.lse = r.lse.ref();
  BackwardTensors b;
  b.query = f.query, b.key = f.key, b.value = f.value, b.rpb = f.rpb;
  b.additional_keys = f.additional_keys, b.additional_values = f.additional_values;
  b.out = f.out, b.lse = f.lse, b.d_out = d_out.ref();
  b.d_query = r.dq.ref(), b.d_key = r.dk.ref(), b.d_value = r.dv.ref();
  if (p.has_rpb) {
    r.drpb = HostTensor(accumulator_dtype(p.dtype), shape_of(in.rpb.ref()));
    b.d_rpb = r.drpb.ref();
  }
  if (p.additional_tokens) {
    r.dak = HostTensor(p.dtype, shape_of(in.ak.ref()));
    r.dav = HostTensor(p.dtype, shape_of(in.av.ref()));
    b.d_additional_keys = r.dak.ref(), b.d_additional_values = r.dav.ref();
  }
  Options opt;
  opt.backend = Backend::kReference;
  for (const UnfoldedPart& part : parts) {
    SCOPED_TRACE("part " + part.problem.to_string());
    Status s = forward(part.problem, detail::part_tensors(f, p, part), opt);
    EXPECT_TRUE(s.ok()) << s.message();
  }
  for (const UnfoldedPart& part : parts) {
    Status s = backward(part.problem, detail::part_tensors(b, p, part), opt);
    EXPECT_TRUE(s.ok()) << s.message();
  }
  return r;
}

class UnfoldedParts : public ::testing::TestWithParam<int> {};  // param: rank

TEST_P(UnfoldedParts, ComputeTheOriginalProblem) {
  const int rank = GetParam();
  int multi_part = 0;
  for (int seed = 0; seed < 60; ++seed) {
    std::mt19937_64 rng(7000 * rank + seed);
    const Problem p = short_group_problem(rng, rank);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    // As the dispatcher does: one part only where d rpb or the additional tokens'
    // gradients are wanted (they sum over every query).
    const bool single_part_only = p.has_rpb || p.additional_tokens > 0;
    const std::vector<UnfoldedPart> parts = detail::unfold_short_groups(p, single_part_only);
    if (parts.empty()) {
      ASSERT_TRUE(single_part_only);  // axis 0's groups are short: only the part count can refuse
      continue;
    }
    multi_part += parts.size() > 1;
    const Inputs in(p, rng, /*gap=*/seed % 3 == 0 ? 2 : 0);
    HostTensor d_out(p.dtype, [&] {
      auto s = shape_of(in.q.ref());
      s.back() = p.value_dim();
      return s;
    }());
    d_out.fill_random(rng);
    const DenseResult dense = testing::dense_attention(p, in, &d_out);
    const PartsResult got = run_parts(p, parts, in, d_out);
    testing::expect_near("out", got.out.values(), dense.out, 1e-10);
    testing::expect_near("lse", got.lse.values(), dense.lse, 1e-12);  // float64 for float64 inputs
    testing::expect_near("dq", got.dq.values(), dense.dq, 1e-9);
    testing::expect_near("dk", got.dk.values(), dense.dk, 1e-9);
    testing::expect_near("dv", got.dv.values(), dense.dv, 1e-9);
    if (p.has_rpb) testing::expect_near("drpb", got.drpb.values(), dense.drpb, 1e-9);
    if (p.additional_tokens) {
      testing::expect_near("dak", got.dak.values(), dense.dak, 1e-9);
      testing::expect_near("dav", got.dav.values(), dense.dav, 1e-9);
    }
  }
  EXPECT_GT(multi_part, 5) << "too few problems with unequal groups: the generator no longer covers them";
}

INSTANTIATE_TEST_SUITE_P(Ranks, UnfoldedParts, ::testing::Values(1, 2));

}  // namespace
}  // namespace nbhd
