// SPDX-License-Identifier: Apache-2.0
// The CPU backends (reference and cpu) against the dense-mask oracle on seeded
// random valid problems: ranks 1-3, awkward extents, dilation, stride, causal, GQA,
// Dv != D, additional tokens, RPB, padded strides.
//
// Tolerances. float64: 1e-10 absolute on O(1) values (both sides accumulate in
// float64; what differs is summation order, ~1e-15 per term). float32: the
// flash-attention rule (testing.hpp) against the reference run as a plain float32
// implementation. Backward is checked against central finite differences of the
// float64 reference (step 1e-6: truncation ~1e-12, cancellation ~1e-10).
#include <gtest/gtest.h>

#include "cpu/reference.hpp"
#include "testing.hpp"

namespace nbhd {
namespace {

using testing::DenseResult;
using testing::HostTensor;
using testing::Inputs;

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }

struct Outputs {
  HostTensor out, lse;
  Outputs(const Problem& p, const Inputs& in)
      : out(p.dtype, [&] {
          auto s = shape_of(in.q.ref());
          s.back() = p.value_dim();
          return s;
        }()),
        lse(accumulator_dtype(p.dtype), [&] {
          auto s = shape_of(in.q.ref());
          s.pop_back();
          return s;
        }()) {}
};

ForwardTensors forward_tensors(const Inputs& in, const Outputs& o) {
  ForwardTensors t;
  t.query = in.q.ref();
  t.key = in.k.ref();
  t.value = in.v.ref();
  t.rpb = in.rpb.ref();
  t.additional_keys = in.ak.ref();
  t.additional_values = in.av.ref();
  t.out = o.out.ref();
  t.lse = o.lse.ref();
  return t;
}

Outputs run_forward(const Problem& p, const Inputs& in, Backend backend) {
  Outputs o(p, in);
  Options opt;
  opt.backend = backend;
  opt.num_threads = 3;  // more workers than cores: exercises the work queue
  const Status s = forward(p, forward_tensors(in, o), opt);
  EXPECT_TRUE(s.ok()) << s.message();
  return o;
}

struct Grads {
  HostTensor dq, dk, dv, drpb, dak, dav;
};

Grads run_backward(const Problem& p, const Inputs& in, const Outputs& fwd, const HostTensor& d_out, Backend backend,
                   const HostTensor& d_lse = HostTensor(), int threads = 3) {
  Grads g{HostTensor(p.dtype, shape_of(in.q.ref())), HostTensor(p.dtype, shape_of(in.k.ref())),
          HostTensor(p.dtype, shape_of(in.v.ref())), HostTensor(), HostTensor(), HostTensor()};
  BackwardTensors t;
  t.query = in.q.ref();
  t.key = in.k.ref();
  t.value = in.v.ref();
  t.rpb = in.rpb.ref();
  t.additional_keys = in.ak.ref();
  t.additional_values = in.av.ref();
  t.out = fwd.out.ref();
  t.lse = fwd.lse.ref();
  t.d_out = d_out.ref();
  t.d_lse = d_lse.ref();
  t.d_query = g.dq.ref();
  t.d_key = g.dk.ref();
  t.d_value = g.dv.ref();
  if (p.has_rpb) {
    g.drpb = HostTensor(accumulator_dtype(p.dtype), shape_of(in.rpb.ref()));
    t.d_rpb = g.drpb.ref();
  }
  if (p.additional_tokens) {
    g.dak = HostTensor(p.dtype, shape_of(in.ak.ref()));
    g.dav = HostTensor(p.dtype, shape_of(in.av.ref()));
    t.d_additional_keys = g.dak.ref();
    t.d_additional_values = g.dav.ref();
  }
  Options opt;
  opt.backend = backend;
  opt.num_threads = threads;
  const Status s = backward(p, t, opt);
  EXPECT_TRUE(s.ok()) << s.message();
  return g;
}

// Every gradient of a float64 backward against the dense oracle, 1e-10 relative.
void expect_grads_match_dense(const Problem& p, const Grads& g, const DenseResult& dense) {
  testing::expect_near("dq", g.dq.values(), dense.dq, 1e-10, 1e-10);
  testing::expect_near("dk", g.dk.values(), dense.dk, 1e-10, 1e-10);
  testing::expect_near("dv", g.dv.values(), dense.dv, 1e-10, 1e-10);
  if (p.has_rpb) testing::expect_near("drpb", g.drpb.values(), dense.drpb, 1e-10, 1e-10);
  if (p.additional_tokens) {
    testing::expect_near("d additional_keys", g.dak.values(), dense.dak, 1e-10, 1e-10);
    testing::expect_near("d additional_values", g.dav.values(), dense.dav, 1e-10, 1e-10);
  }
}

class CpuBackends : public ::testing::TestWithParam<int> {};  // param: rank

TEST_P(CpuBackends, ForwardFloat64MatchesDenseOracle) {
  const int rank = GetParam();
  for (int seed = 0; seed < 40; ++seed) {
    std::mt19937_64 rng(1000 * rank + seed);
    const Problem p = testing::random_problem(rng, {rank, DType::kFloat64});
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng, /*gap=*/seed % 3 == 0 ? 2 : 0);
    const DenseResult dense = testing::dense_attention(p, in);
    for (Backend b : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(b));
      const Outputs o = run_forward(p, in, b);
      testing::expect_near("out", o.out.values(), dense.out, 1e-10);
      testing::expect_near("lse", o.lse.values(), dense.lse, 1e-12);  // float64 lse for float64 inputs
    }
  }
}

TEST_P(CpuBackends, ForwardFloat32FollowsToleranceRule) {
  const int rank = GetParam();
  for (int seed = 0; seed < 30; ++seed) {
    std::mt19937_64 rng(2000 * rank + seed);
    const Problem p = testing::random_problem(rng, {rank, DType::kFloat32});
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng);
    const DenseResult dense = testing::dense_attention(p, in);
    Outputs plain(p, in);
    ASSERT_TRUE(cpu::reference_forward(p, forward_tensors(in, plain), /*plain_low_precision=*/true).ok());
    for (Backend b : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(b));
      const Outputs o = run_forward(p, in, b);
      testing::expect_close("out", p.dtype, o.out.values(), dense.out, plain.out.values());
      testing::expect_near("lse", o.lse.values(), dense.lse, 1e-5, 1e-6);
    }
  }
}

// The baseline of the tensor-core float32 kernels' tolerance rule (fused, gemm):
// products from three tf32 ones lose ~2^-21 relative each, so the plain result stays
// within float32 class of the exact one, yet differs from plain float32 products (a
// no-op model would make the rule no stricter than before, a broken split looser).
TEST_P(CpuBackends, PlainTf32x3ProductsAreFloat32Class) {
  const int rank = GetParam();
  int differing = 0;
  for (int seed = 0; seed < 10; ++seed) {
    std::mt19937_64 rng(2500 * rank + seed);
    const Problem p = testing::random_problem(rng, {rank, DType::kFloat32});
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng);
    const DenseResult dense = testing::dense_attention(p, in);
    Outputs plain(p, in), split(p, in);
    ASSERT_TRUE(cpu::reference_forward(p, forward_tensors(in, plain), true).ok());
    ASSERT_TRUE(cpu::reference_forward(p, forward_tensors(in, split), true, cpu::PlainProducts::kTf32x3).ok());
    double max_ref = 1;
    for (double x : dense.out) max_ref = std::max(max_ref, std::abs(x));
    testing::expect_near("out", split.out.values(), dense.out, 1e-5 * max_ref);
    differing += split.out.values() != plain.out.values();
  }
  EXPECT_GE(differing, 5) << "three-tf32 products should change most problems' plain results";
}

TEST_P(CpuBackends, HalfPrecisionInputsAccumulateInFloat32) {
  const int rank = GetParam();
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int seed = 0; seed < 10; ++seed) {
      std::mt19937_64 rng(3000 * rank + seed);
      const Problem p = testing::random_problem(rng, {rank, dtype});
      SCOPED_TRACE(p.to_string());
      const Inputs in(p, rng);
      const DenseResult dense = testing::dense_attention(p, in);
      Outputs plain(p, in);
      ASSERT_TRUE(cpu::reference_forward(p, forward_tensors(in, plain), true).ok());
      const Outputs o = run_forward(p, in, Backend::kCpu);
      testing::expect_close("out", p.dtype, o.out.values(), dense.out, plain.out.values());
    }
  }
}

TEST_P(CpuBackends, BackwardFloat64MatchesDenseOracle) {
  const int rank = GetParam();
  for (int seed = 0; seed < 30; ++seed) {
    std::mt19937_64 rng(4000 * rank + seed);
    const Problem p = testing::random_problem(rng, {rank, DType::kFloat64});
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng, seed % 4 == 1 ? 3 : 0);
    const Outputs fwd = run_forward(p, in, Backend::kReference);
    HostTensor d_out(p.dtype, shape_of(fwd.out.ref()));
    d_out.fill_random(rng);
    // Every third seed's loss uses lse too (BackwardTensors::d_lse).
    HostTensor d_lse = seed % 3 == 2 ? HostTensor(p.dtype, shape_of(fwd.lse.ref())) : HostTensor();
    if (seed % 3 == 2) d_lse.fill_random(rng);
    const DenseResult dense = testing::dense_attention(p, in, &d_out, seed % 3 == 2 ? &d_lse : nullptr);
    for (Backend b : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(b));
      const Grads g = run_backward(p, in, fwd, d_out, b, d_lse);
      // float64 throughout, lse and d_rpb included (with a float32 lse the agreement
      // stopped at ~1e-7 relative).
      expect_grads_match_dense(p, g, dense);
    }
  }
}

TEST_P(CpuBackends, BackwardCpuMatchesReferenceInFloat32) {
  const int rank = GetParam();
  for (int seed = 0; seed < 20; ++seed) {
    std::mt19937_64 rng(5000 * rank + seed);
    const Problem p = testing::random_problem(rng, {rank, DType::kFloat32});
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng);
    const Outputs fwd = run_forward(p, in, Backend::kReference);
    HostTensor d_out(p.dtype, shape_of(fwd.out.ref()));
    d_out.fill_random(rng);
    const Grads ref = run_backward(p, in, fwd, d_out, Backend::kReference);
    const Grads got = run_backward(p, in, fwd, d_out, Backend::kCpu);
    // float32 accumulation over at most ~10^3 terms of O(1): 1e-4 relative is ~10x
    // the expected error and ~1000x below the effect of a missing term.
    testing::expect_near("dq", got.dq.values(), ref.dq.values(), 1e-4, 1e-4);
    testing::expect_near("dk", got.dk.values(), ref.dk.values(), 1e-4, 1e-4);
    testing::expect_near("dv", got.dv.values(), ref.dv.values(), 1e-4, 1e-4);
    if (p.has_rpb) testing::expect_near("drpb", got.drpb.values(), ref.drpb.values(), 1e-3, 1e-4);
    if (p.additional_tokens) {
      testing::expect_near("dak", got.dak.values(), ref.dak.values(), 1e-4, 1e-4);
      testing::expect_near("dav", got.dav.values(), ref.dav.values(), 1e-4, 1e-4);
    }
  }
}

// The cpu backend's gradients have the same bits for every thread count and run
// (d rpb sums per block of query tiles, not per worker: per worker, the dynamic
// hand-out of tiles put different terms in each partial sum from run to run).
TEST_P(CpuBackends, BackwardIsBitwiseTheSameForEveryThreadCount) {
  const int rank = GetParam();
  for (int seed = 0; seed < 4; ++seed) {
    std::mt19937_64 rng(5600 * rank + seed);
    testing::RandomOptions o;
    o.rank = rank;
    o.dtype = DType::kFloat32;
    o.max_extent = rank == 1 ? 300 : rank == 2 ? 24 : 9;
    Problem p = testing::random_problem(rng, o);
    p.has_rpb = true;
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng);
    const Outputs fwd = run_forward(p, in, Backend::kCpu);
    HostTensor d_out(p.dtype, shape_of(fwd.out.ref()));
    d_out.fill_random(rng);
    const Grads one = run_backward(p, in, fwd, d_out, Backend::kCpu, HostTensor(), 1);
    for (int threads : {2, 5, 16, 16}) {
      const Grads many = run_backward(p, in, fwd, d_out, Backend::kCpu, HostTensor(), threads);
      SCOPED_TRACE(std::to_string(threads) + " threads");
      EXPECT_EQ(many.dq.values(), one.dq.values());
      EXPECT_EQ(many.dk.values(), one.dk.values());
      EXPECT_EQ(many.dv.values(), one.dv.values());
      EXPECT_EQ(many.drpb.values(), one.drpb.values());
    }
  }
}

// Periodic axes (spec 3'): the reference and the tiled cpu backend against the dense
// oracle, forward and backward in float64, with every other feature drawn alongside
// (the cpu backend's key tiles near a group's end gather queries past it).
TEST_P(CpuBackends, PeriodicAxesMatchDenseOracle) {
  const int rank = GetParam();
  int periodic_problems = 0;
  for (int seed = 0; seed < 40; ++seed) {
    std::mt19937_64 rng(7000 * rank + seed);
    testing::RandomOptions ro{rank, DType::kFloat64};
    ro.allow_periodic = true;
    const Problem p = testing::random_problem(rng, ro);
    if (!p.any_periodic()) continue;
    ++periodic_problems;
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const Inputs in(p, rng, seed % 3 == 0 ? 2 : 0);
    HostTensor d_out(p.dtype, shape_of(Outputs(p, in).out.ref()));
    d_out.fill_random(rng);
    const DenseResult dense = testing::dense_attention(p, in, &d_out);
    for (Backend backend : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(backend));
      const Outputs fwd = run_forward(p, in, backend);
      testing::expect_near("out", fwd.out.values(), dense.out, 1e-10);
      testing::expect_near("lse", fwd.lse.values(), dense.lse, 1e-12);
      const Grads g = run_backward(p, in, fwd, d_out, backend);
      expect_grads_match_dense(p, g, dense);
    }
  }
  EXPECT_GE(periodic_problems, 15);
}

INSTANTIATE_TEST_SUITE_P(Ranks, CpuBackends, ::testing::Values(1, 2, 3),
                         [](const auto& info) { return "rank" + std::to_string(info.param); });

// Central finite differences of L = <out, d_out> through the float64 reference.
TEST(ReferenceBackward, MatchesFiniteDifferences) {
  for (int seed = 0; seed < 12; ++seed) {
    std::mt19937_64 rng(6000 + seed);
    testing::RandomOptions ro{1 + seed % 3, DType::kFloat64};
    const Problem p = testing::random_problem(rng, ro);
    SCOPED_TRACE(p.to_string());
    Inputs in(p, rng);
    const Outputs fwd = run_forward(p, in, Backend::kReference);
    HostTensor d_out(p.dtype, shape_of(fwd.out.ref()));
    d_out.fill_random(rng);
    const Grads g = run_backward(p, in, fwd, d_out, Backend::kReference);
    auto loss = [&] {
      const Outputs o = run_forward(p, in, Backend::kReference);
      double l = 0;
      for (int64_t i = 0; i < o.out.numel(); ++i) l += o.out.get(i) * d_out.get(i);
      return l;
    };
    auto check = [&](const char* what, HostTensor& x, const HostTensor& grad) {
      if (x.numel() == 0) return;
      for (int n = 0; n < 6; ++n) {
        const int64_t i = std::uniform_int_distribution<int64_t>(0, x.numel() - 1)(rng);
        const double x0 = x.get(i), h = 1e-6;
        x.set(i, x0 + h);
        const double up = loss();
        x.set(i, x0 - h);
        const double down = loss();
        x.set(i, x0);
        EXPECT_NEAR(grad.get(i), (up - down) / (2 * h), 1e-6) << what << "[" << i << "]";
      }
    };
    check("q", in.q, g.dq);
    check("k", in.k, g.dk);
    check("v", in.v, g.dv);
    if (p.has_rpb) check("rpb", in.rpb, g.drpb);
    if (p.additional_tokens) {
      check("additional_keys", in.ak, g.dak);
      check("additional_values", in.av, g.dav);
    }
  }
}

}  // namespace
}  // namespace nbhd
