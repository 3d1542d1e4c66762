// SPDX-License-Identifier: Apache-2.0
// The query sub-box (Problem::query_begin / query_end) on the CPU backends. On seeded
// random valid problems (ranks 1-3, dilation with unequal groups, stride, causal,
// periodic, GQA, rpb, additional tokens, padded strides) and a random sub-box:
// forward and backward equal the whole problem's restricted to the sub-box. The whole
// problem runs on the float64 reference with d_out zero outside the sub-box, so its dk,
// dv, d rpb and additional-token gradients are the sub-box's (d lse likewise). Also: validation, the
// counts, to_string, and the refusals of the unfused operations.
//
// Tolerances: float64 1e-10 (absolute and relative, summation order only, as in
// cpu_backends_test.cpp); float32 see Float32ForwardEqualsTheWholeProblemRestricted.
#include <gtest/gtest.h>

#include "testing.hpp"

namespace nbhd {
namespace {

using testing::HostTensor;
using testing::Inputs;
using testing::with_random_box;

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }

// Logical index in a [B, X..., trailing...] tensor of `whole` shape of logical index i
// of the same tensor restricted to the query sub-box of `boxed`.
int64_t whole_index(int64_t i, const std::vector<int64_t>& whole, const Problem& boxed) {
  const int n = int(whole.size());
  std::vector<int64_t> shape = whole;
  for (int a = 0; a < boxed.rank; ++a) shape[1 + a] = boxed.padded_query_range(kMaxRank - boxed.rank + a).size();
  int64_t out = 0, step = 1;
  for (int d = n - 1; d >= 0; --d) {
    int64_t c = i % shape[d];
    i /= shape[d];
    if (d >= 1 && d <= boxed.rank) c += boxed.padded_query_range(kMaxRank - boxed.rank + d - 1).begin;
    out += c * step;
    step *= whole[d];
  }
  return out;
}

std::vector<int64_t> box_shape(std::vector<int64_t> whole, const Problem& boxed) {
  for (int a = 0; a < boxed.rank; ++a) whole[1 + a] = boxed.padded_query_range(kMaxRank - boxed.rank + a).size();
  return whole;
}

// The sub-box's part of a grid tensor's values (row-major).
std::vector<double> restricted(const std::vector<double>& values, const std::vector<int64_t>& whole,
                               const Problem& boxed) {
  std::vector<int64_t> shape = box_shape(whole, boxed);
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = values[whole_index(i, whole, boxed)];
  return out;
}

HostTensor restricted_tensor(const HostTensor& t, const Problem& boxed, DType dtype) {
  const std::vector<int64_t> whole = shape_of(t.ref());
  const std::vector<double> v = restricted(t.values(), whole, boxed);
  HostTensor out(dtype, box_shape(whole, boxed));
  for (int64_t i = 0; i < out.numel(); ++i) out.set(i, v[i]);
  return out;
}

// A grid tensor holding `box` (a tensor over the sub-box of `boxed`) and zeros elsewhere.
HostTensor embedded(const HostTensor& box, const std::vector<int64_t>& whole, const Problem& boxed) {
  HostTensor out(box.ref().dtype, whole);
  for (int64_t i = 0; i < box.numel(); ++i) out.set(whole_index(i, whole, boxed), box.get(i));
  return out;
}

struct Results {
  HostTensor out, lse, dq, dk, dv, drpb, dak, dav;
};

// Forward (and, with d_out, backward, with lse's gradient d_lse) of `p` on query `q`,
// the other inputs from `in`.
Results run(const Problem& p, const Inputs& in, const HostTensor& q, Backend backend, const HostTensor* d_out = nullptr,
            const HostTensor* d_lse = nullptr) {
  Results r;
  std::vector<int64_t> out_shape = shape_of(q.ref());
  out_shape.back() = p.value_dim();
  std::vector<int64_t> lse_shape = shape_of(q.ref());
  lse_shape.pop_back();
  r.out = HostTensor(p.dtype, out_shape);
  r.lse = HostTensor(accumulator_dtype(p.dtype), lse_shape);
  ForwardTensors f;
  f.query = q.ref();
  f.key = in.k.ref();
  f.value = in.v.ref();
  f.rpb = in.rpb.ref();
  f.additional_keys = in.ak.ref();
  f.additional_values = in.av.ref();
  f.out = r.out.ref();
  f.lse = r.lse.ref();
  Options o;
  o.backend = backend;
  o.num_threads = 3;
  Status s = forward(p, f, o);
  EXPECT_TRUE(s.ok()) << s.message();
  if (!d_out) return r;
  r.dq = HostTensor(p.dtype, shape_of(q.ref()));
  r.dk = HostTensor(p.dtype, shape_of(in.k.ref()));
  r.dv = HostTensor(p.dtype, shape_of(in.v.ref()));
  BackwardTensors b;
  b.query = q.ref();
  b.key = in.k.ref();
  b.value = in.v.ref();
  b.rpb = in.rpb.ref();
  b.additional_keys = in.ak.ref();
  b.additional_values = in.av.ref();
  b.out = r.out.ref();
  b.lse = r.lse.ref();
  b.d_out = d_out->ref();
  if (d_lse) b.d_lse = d_lse->ref();
  b.d_query = r.dq.ref();
  b.d_key = r.dk.ref();
  b.d_value = r.dv.ref();
  if (p.has_rpb) {
    r.drpb = HostTensor(accumulator_dtype(p.dtype), shape_of(in.rpb.ref()));
    b.d_rpb = r.drpb.ref();
  }
  if (p.additional_tokens) {
    r.dak = HostTensor(p.dtype, shape_of(in.ak.ref()));
    r.dav = HostTensor(p.dtype, shape_of(in.av.ref()));
    b.d_additional_keys = r.dak.ref();
    b.d_additional_values = r.dav.ref();
  }
  s = backward(p, b, o);
  EXPECT_TRUE(s.ok()) << s.message();
  return r;
}

class QueryBox : public ::testing::TestWithParam<int> {};  // param: rank

TEST_P(QueryBox, Float64ForwardAndBackwardEqualTheWholeProblemRestricted) {
  const int rank = GetParam();
  int proper = 0, periodic = 0;
  for (int seed = 0; seed < 60; ++seed) {
    std::mt19937_64 rng(8000 * rank + seed);
    testing::RandomOptions ro{rank, DType::kFloat64};
    ro.allow_periodic = seed % 2 == 1;
    const Problem whole = testing::random_problem(rng, ro);
    const Problem boxed = with_random_box(whole, rng);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + boxed.to_string());
    ASSERT_TRUE(boxed.validate().ok()) << boxed.validate().message();
    proper += boxed.has_query_box();
    periodic += boxed.has_query_box() && boxed.any_periodic();
    const Inputs in(whole, rng, seed % 3 == 0 ? 2 : 0);
    const HostTensor q = restricted_tensor(in.q, boxed, whole.dtype);
    const std::vector<int64_t> out_shape = [&] {
      std::vector<int64_t> s = shape_of(in.q.ref());
      s.back() = whole.value_dim();
      return s;
    }();
    std::vector<int64_t> lse_shape = shape_of(in.q.ref());
    lse_shape.pop_back();
    HostTensor d_out(whole.dtype, box_shape(out_shape, boxed)), d_lse(whole.dtype, box_shape(lse_shape, boxed));
    d_out.fill_random(rng);
    d_lse.fill_random(rng);
    const HostTensor whole_d_out = embedded(d_out, out_shape, boxed), whole_d_lse = embedded(d_lse, lse_shape, boxed);
    const Results expected = run(whole, in, in.q, Backend::kReference, &whole_d_out, &whole_d_lse);
    for (Backend b : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(b));
      const Results got = run(boxed, in, q, b, &d_out, &d_lse);
      testing::expect_near("out", got.out.values(),
                           restricted(expected.out.values(), shape_of(expected.out.ref()), boxed), 1e-10, 1e-10);
      testing::expect_near("lse", got.lse.values(),
                           restricted(expected.lse.values(), shape_of(expected.lse.ref()), boxed), 1e-10, 1e-10);
      testing::expect_near("dq", got.dq.values(),
                           restricted(expected.dq.values(), shape_of(expected.dq.ref()), boxed), 1e-10, 1e-10);
      testing::expect_near("dk", got.dk.values(), expected.dk.values(), 1e-10, 1e-10);
      testing::expect_near("dv", got.dv.values(), expected.dv.values(), 1e-10, 1e-10);
      if (whole.has_rpb) testing::expect_near("drpb", got.drpb.values(), expected.drpb.values(), 1e-10, 1e-10);
      if (whole.additional_tokens) {
        testing::expect_near("dak", got.dak.values(), expected.dak.values(), 1e-10, 1e-10);
        testing::expect_near("dav", got.dav.values(), expected.dav.values(), 1e-10, 1e-10);
      }
    }
  }
  EXPECT_GE(proper, 40);
  EXPECT_GE(periodic, 5);
}

// A query's arithmetic does not depend on the sub-box (only the tiles around it do), so
// in float32 the sub-box's out is the whole problem's of the same backend restricted,
// up to the order of a few float32 sums (1e-6; a missing or extra term is ~1e-1). The
// whole problem's out follows the flash-attention rule (cpu_backends_test.cpp); the
// rule is not applied to the box alone, whose few queries (often one) make the plain
// baseline's error a sample too small to bound another implementation's.
TEST_P(QueryBox, Float32ForwardEqualsTheWholeProblemRestricted) {
  const int rank = GetParam();
  for (int seed = 0; seed < 20; ++seed) {
    std::mt19937_64 rng(9000 * rank + seed);
    testing::RandomOptions ro{rank, DType::kFloat32};
    ro.allow_periodic = true;
    const Problem whole = testing::random_problem(rng, ro);
    const Problem boxed = with_random_box(whole, rng);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + boxed.to_string());
    const Inputs in(whole, rng);
    const HostTensor q = restricted_tensor(in.q, boxed, whole.dtype);
    for (Backend b : {Backend::kReference, Backend::kCpu}) {
      SCOPED_TRACE(name(b));
      const Results expected = run(whole, in, in.q, b);
      const Results got = run(boxed, in, q, b);
      testing::expect_near("out", got.out.values(),
                           restricted(expected.out.values(), shape_of(expected.out.ref()), boxed), 1e-6, 1e-6);
      testing::expect_near("lse", got.lse.values(),
                           restricted(expected.lse.values(), shape_of(expected.lse.ref()), boxed), 1e-6, 1e-6);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, QueryBox, ::testing::Values(1, 2, 3),
                         [](const auto& info) { return "rank" + std::to_string(info.param); });

Problem two_d() {
  Problem p;
  p.rank = 2;
  p.extent = {10, 7, 0};
  p.kernel = {3, 5, 0};
  p.dilation = {2, 1, 1};
  p.dim = 4;
  return p;
}

void expect_invalid(const Problem& p, std::initializer_list<const char*> words) {
  const Status s = p.validate();
  ASSERT_FALSE(s.ok()) << p.to_string();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  for (const char* w : words) EXPECT_NE(s.message().find(w), std::string::npos) << "'" << w << "' not in: " << s.message();
}

TEST(QueryBoxValidation, BadBoxesNameTheAxisAndTheBound) {
  Problem p = two_d();
  p.query_begin[1] = -1;
  expect_invalid(p, {"query_begin[axis 1] = -1", "[0, extent = 7)"});
  p = two_d(), p.query_begin[0] = 10;
  expect_invalid(p, {"query_begin[axis 0] = 10", "[0, extent = 10)"});
  p = two_d(), p.query_end[1] = 8;
  expect_invalid(p, {"query_end[axis 1] = 8", "extent = 7]"});
  p = two_d(), p.query_begin[0] = 4, p.query_end[0] = 4;
  expect_invalid(p, {"query_end[axis 0] = 4", "(query_begin = 4"});
  p = two_d(), p.query_end[0] = -2;
  expect_invalid(p, {"query_end[axis 0] = -2"});
  p = two_d(), p.query_begin = {2, 1, 0}, p.query_end = {9, 0, 0};
  EXPECT_TRUE(p.validate().ok()) << p.validate().message();
}

TEST(QueryBoxValidation, TensorsHaveTheBoxOnTheQuerySideAndTheGridOnTheKeySide) {
  Problem p = two_d();
  p.query_begin = {2, 1, 0};
  p.query_end = {9, 0, 0};
  HostTensor grid(DType::kFloat32, {1, 10, 7, 1, 4}), box(DType::kFloat32, {1, 7, 6, 1, 4});
  HostTensor out(DType::kFloat32, {1, 7, 6, 1, 4}), grid_out(DType::kFloat32, {1, 10, 7, 1, 4});
  ForwardTensors t;
  t.query = box.ref(), t.key = grid.ref(), t.value = grid.ref(), t.out = out.ref();
  EXPECT_TRUE(forward(p, t).ok()) << forward(p, t).message();
  t.query = grid.ref();
  Status s = forward(p, t);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("query has shape [1, 10, 7, 1, 4] but the problem needs [1, 7, 6, 1, 4]"),
            std::string::npos) << s.message();
  t.query = box.ref(), t.key = box.ref();
  s = forward(p, t);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("key has shape [1, 7, 6, 1, 4] but the problem needs [1, 10, 7, 1, 4]"),
            std::string::npos) << s.message();
  t.key = grid.ref(), t.out = grid_out.ref();
  s = forward(p, t);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("out has shape"), std::string::npos) << s.message();
}

TEST(QueryBoxValidation, TheUnfusedOperationsRefuseABox) {
  Problem p = two_d();
  p.query_begin[0] = 1;
  HostTensor q(DType::kFloat32, {1, 9, 7, 1, 4}), k(DType::kFloat32, {1, 10, 7, 1, 4});
  HostTensor attn(DType::kFloat32, {1, 9, 7, 1, 15});
  QkTensors t;
  t.query = q.ref(), t.key = k.ref(), t.attn = attn.ref();
  const Status s = qk(p, t);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("query sub-box"), std::string::npos) << s.message();
}

// The counts and the description see only the sub-box's queries; a box that is the
// whole grid is no box.
TEST(QueryBoxCounts, PairsFlopsBytesAndDescription) {
  Problem p = two_d();
  p.causal = {false, true, false};
  p.stride = {1, 2, 1};
  p.query_begin = {3, 2, 0};
  p.query_end = {8, 6, 0};
  const Neighborhood nb = p.neighborhood();
  int64_t pairs = 0;
  for (int x1 = 3; x1 < 8; ++x1)
    for (int x2 = 2; x2 < 6; ++x2)
      for (int k1 = 0; k1 < 10; ++k1)
        for (int k2 = 0; k2 < 7; ++k2) {
          const int q[kMaxRank] = {0, x1, x2}, k[kMaxRank] = {0, k1, k2};
          pairs += nb.is_neighbor(q, k);
        }
  EXPECT_EQ(p.attended_pairs(), pairs);
  EXPECT_EQ(p.query_tokens(), 20);
  EXPECT_DOUBLE_EQ(p.forward_flops(), 2.0 * pairs * (4 + 4));
  EXPECT_NE(p.to_string().find(" query_box=3:8x2:6"), std::string::npos) << p.to_string();
  Problem whole = p;
  whole.query_begin = {0, 0, 0};
  whole.query_end = {10, 7, 0};
  EXPECT_FALSE(whole.has_query_box());
  EXPECT_EQ(whole.to_string().find("query_box"), std::string::npos) << whole.to_string();
  Problem unboxed = p;
  unboxed.query_begin = unboxed.query_end = {};
  EXPECT_EQ(whole.attended_pairs(), unboxed.attended_pairs());
  EXPECT_LT(p.forward_bytes(), whole.forward_bytes());
}

}  // namespace
}  // namespace nbhd
