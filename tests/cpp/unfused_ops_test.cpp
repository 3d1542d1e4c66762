// SPDX-License-Identifier: Apache-2.0
// The unfused operations (qk, softmax, av and their gradients) composed equal the
// fused forward and backward, and the attention weights sit in their window slots.
#include <gtest/gtest.h>

#include <cmath>

#include "testing.hpp"

namespace nbhd {
namespace {

using testing::DenseResult;
using testing::HostTensor;
using testing::Inputs;

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }
std::vector<int64_t> with_last(std::vector<int64_t> s, int64_t last) {
  s.back() = last;
  return s;
}

TEST(UnfusedOps, ComposeToAttention) {
  for (int seed = 0; seed < 45; ++seed) {
    std::mt19937_64 rng(7000 + seed);
    testing::RandomOptions ro{1 + seed % 3, DType::kFloat64};
    ro.allow_periodic = seed % 2 == 1;  // half the problems may have periodic axes
    const Problem p = testing::random_problem(rng, ro);
    SCOPED_TRACE(p.to_string());
    const Inputs in(p, rng, seed % 2);
    const int64_t slots = p.window_size() + p.additional_tokens;
    HostTensor attn(p.dtype, with_last(shape_of(in.q.ref()), slots));
    HostTensor out(p.dtype, with_last(shape_of(in.q.ref()), p.value_dim()));
    ASSERT_TRUE(qk(p, {in.q.ref(), in.k.ref(), in.rpb.ref(), in.ak.ref(), attn.ref()}).ok());
    // Slots a causal window does not reach hold -inf; every row has a finite score.
    const std::vector<double> scores = attn.values();
    for (int64_t row = 0; row < int64_t(scores.size()) / slots; ++row) {
      int finite = 0;
      for (int64_t w = 0; w < slots; ++w) finite += std::isfinite(scores[row * slots + w]);
      ASSERT_GE(finite, 1);
      if (!std::any_of(p.causal.begin(), p.causal.begin() + p.rank, [](bool c) { return c; }))
        ASSERT_EQ(finite, slots);
    }
    ASSERT_TRUE(softmax(p, {attn.ref(), attn.ref()}).ok());  // in place
    ASSERT_TRUE(av(p, {attn.ref(), in.v.ref(), in.av.ref(), out.ref()}).ok());
    HostTensor d_out(p.dtype, shape_of(out.ref()));
    d_out.fill_random(rng);
    const DenseResult dense = testing::dense_attention(p, in, &d_out);
    testing::expect_near("out", out.values(), dense.out, 1e-10);

    // Backward through the three operations.
    HostTensor d_probs(p.dtype, shape_of(attn.ref())), dv(p.dtype, shape_of(in.v.ref()));
    HostTensor dq(p.dtype, shape_of(in.q.ref())), dk(p.dtype, shape_of(in.k.ref()));
    HostTensor dav, dak, drpb;
    if (p.additional_tokens) {
      dav = HostTensor(p.dtype, shape_of(in.av.ref()));
      dak = HostTensor(p.dtype, shape_of(in.ak.ref()));
    }
    if (p.has_rpb) drpb = HostTensor(accumulator_dtype(p.dtype), shape_of(in.rpb.ref()));
    ASSERT_TRUE(av_backward(p, {attn.ref(), in.v.ref(), in.av.ref(), d_out.ref(), d_probs.ref(), dv.ref(), dav.ref()}).ok());
    ASSERT_TRUE(softmax_backward(p, {attn.ref(), d_probs.ref(), d_probs.ref()}).ok());
    ASSERT_TRUE(qk_backward(p, {in.q.ref(), in.k.ref(), in.ak.ref(), d_probs.ref(), dq.ref(), dk.ref(), drpb.ref(),
                                dak.ref()})
                    .ok());
    testing::expect_near("dq", dq.values(), dense.dq, 1e-10, 1e-10);
    testing::expect_near("dk", dk.values(), dense.dk, 1e-10, 1e-10);
    testing::expect_near("dv", dv.values(), dense.dv, 1e-10, 1e-10);
    if (p.has_rpb) testing::expect_near("drpb", drpb.values(), dense.drpb, 1e-10, 1e-10);
    if (p.additional_tokens) {
      testing::expect_near("dak", dak.values(), dense.dak, 1e-10, 1e-10);
      testing::expect_near("dav", dav.values(), dense.dav, 1e-10, 1e-10);
    }
  }
}

TEST(UnfusedOps, WeightsAreInWindowSlots) {
  // 1-D, L=6, k=3: query 0 sees keys 0,1,2 in slots 0,1,2; query 5 sees 3,4,5.
  Problem p;
  p.rank = 1;
  p.extent = {6, 0, 0};
  p.kernel = {3, 0, 0};
  p.dim = 1;
  p.scale = 1.0;
  p.dtype = DType::kFloat64;
  HostTensor q(p.dtype, {1, 6, 1, 1}), k(p.dtype, {1, 6, 1, 1}), attn(p.dtype, {1, 6, 1, 3});
  for (int i = 0; i < 6; ++i) {
    q.set(i, 1.0);
    k.set(i, double(i));  // score = key index
  }
  ASSERT_TRUE(qk(p, {q.ref(), k.ref(), TensorRef{}, TensorRef{}, attn.ref()}).ok());
  const std::vector<double> a = attn.values();
  EXPECT_EQ(std::vector<double>(a.begin(), a.begin() + 3), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(std::vector<double>(a.begin() + 6, a.begin() + 9), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(std::vector<double>(a.end() - 3, a.end()), (std::vector<double>{3, 4, 5}));
}

}  // namespace
}  // namespace nbhd
