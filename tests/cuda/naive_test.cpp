// SPDX-License-Identifier: Apache-2.0
// The naive CUDA backend against the CPU reference on seeded random valid problems
// (ranks 1-3, awkward extents, unequal dilation groups, stride, per-axis causal, GQA,
// Dv != D, additional tokens, rpb in the dtype or float32, padded strides), float32,
// float16 and bfloat16; every unfused operation; a problem with more than 2^31
// elements in one tensor; the workspace errors. The CPU tests at the top check the
// indexing the kernels use (cuda/naive/walk.hpp) against the spec oracle and run
// without a GPU.
//
// Tolerances.
// - Forward: the flash-attention rule (testing.hpp) against the float64 reference,
//   the baseline being the reference run as a plain implementation in the dtype;
//   lse to 1e-4 (float32 scores of at most a few hundred O(1) products).
// - Unfused operations and gradients: ours and the reference each round once to the
//   output dtype, so 2 ulps of it (float16 2^-9, bfloat16 2^-6 relative); in float32,
//   1e-5 relative for operations and 1e-4 for gradients (softmax and its backward
//   in float32 feed them). Plus an absolute term for float32 accumulation: 1e-5 of
//   the largest value for sums of up to ~10^2 O(1) terms, 1e-4 for the sums over
//   all tokens (additional tokens, d rpb: up to ~10^4 terms). A missing or extra
//   term moves a value by O(1/10) or more, far above all of these.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/element.hpp"
#include "cpu/reference.hpp"
#include "cuda/naive/plan.hpp"
#include "cuda/naive/walk.hpp"
#include "cuda_testing.hpp"

namespace nbhd {
namespace {

using testing::DeviceTensor;
using testing::HostTensor;
using testing::Inputs;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace

// How gtest names a DType parameter in test listings (found by ADL).
void PrintTo(DType t, std::ostream* os) { *os << name(t); }

namespace {

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }
std::vector<int64_t> with_last(std::vector<int64_t> s, int64_t last) {
  s.back() = last;
  return s;
}
std::vector<int64_t> without_last(std::vector<int64_t> s) {
  s.pop_back();
  return s;
}

#define NBHD_REQUIRE_NAIVE() \
  if (!testing::built(Backend::kNaive)) GTEST_SKIP() << "the naive backend is not in this build (NBHD_BACKENDS)"

Options naive_options() {
  Options o;
  o.backend = Backend::kNaive;
  return o;
}

// A packed copy of the logical values of a host tensor, in `dtype`.
HostTensor convert(const TensorRef& t, DType dtype) {
  if (!t.defined()) return HostTensor();
  HostTensor out(dtype, shape_of(t));
  for (int64_t i = 0; i < out.numel(); ++i) {
    int64_t offset = 0, rest = i;
    for (int d = t.ndim - 1; d >= 0; --d) {
      offset += (rest % t.shape[d]) * t.stride[d];
      rest /= t.shape[d];
    }
    out.set(i, cpu::load(t, offset));
  }
  return out;
}

// A tensor of `shape` whose every element is NaN: the kernel must write them all.
HostTensor poisoned(DType dtype, const std::vector<int64_t>& shape, int64_t gap) {
  HostTensor t(dtype, shape, gap);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, kNaN);
  return t;
}

// Two roundings to the output dtype apart (see the file comment).
double two_ulps(DType t) {
  switch (t) {
    case DType::kFloat16: return std::ldexp(1.0, -9);
    case DType::kBFloat16: return std::ldexp(1.0, -6);
    default: return 1e-5;
  }
}

// |got - ref| <= rtol |ref| + atol_factor * max(1, max |ref|); infinities must match
// exactly, NaN never passes.
void expect_match(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref, double rtol,
                  double atol_factor) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double scale = 1;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::abs(r));
  const double atol = atol_factor * scale;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const bool ok = std::isinf(ref[i]) ? got[i] == ref[i] : std::abs(got[i] - ref[i]) <= atol + rtol * std::abs(ref[i]);
    if (!ok) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << ref[i] << " (tolerance "
                    << atol + rtol * std::abs(ref[i]) << ")";
      ++bad;
    }
  }
}

// ============================================================================
// CPU: the indexing of walk.hpp against the spec oracle (no GPU needed)
// ============================================================================

std::vector<testing::SpecAxis> spec_axes(const Neighborhood& nb) {
  std::vector<testing::SpecAxis> axes;
  for (const Axis& ax : nb.axis) axes.push_back({ax.length, ax.kernel, ax.dilation, ax.stride, ax.causal, ax.periodic});
  return axes;
}

int64_t flat_token(const Neighborhood& nb, const int* x) {
  return (int64_t(x[0]) * nb.axis[1].length + x[1]) * nb.axis[2].length + x[2];
}

// Calls f(token) for every token of the padded grid.
template <class F>
void for_each_grid_token(const Neighborhood& nb, F&& f) {
  for (int x0 = 0; x0 < nb.axis[0].length; ++x0)
    for (int x1 = 0; x1 < nb.axis[1].length; ++x1)
      for (int x2 = 0; x2 < nb.axis[2].length; ++x2) {
        const int x[kMaxRank] = {x0, x1, x2};
        f(x);
      }
}

// Per axis, the spec's neighbors of a query coordinate in window order (the slot
// order): its window entries as tokens, a periodic entry taken modulo the group
// length. Elsewhere that is the ascending neighbor list, which it is checked against.
std::array<std::vector<int>, kMaxRank> spec_lists(const std::vector<testing::SpecAxis>& axes, const int* query) {
  std::array<std::vector<int>, kMaxRank> lists;
  for (int a = 0; a < kMaxRank; ++a) {
    const testing::SpecAxis& ax = axes[a];
    const int g = query[a] % ax.d, lg = (ax.L - g + ax.d - 1) / ax.d;
    for (int w : testing::spec_axis_window(ax, query[a])) lists[a].push_back(g + ax.d * (((w % lg) + lg) % lg));
    if (!ax.periodic) EXPECT_EQ(lists[a], testing::spec_axis_neighbors(ax, query[a]));
  }
  return lists;
}

// Kernel offsets of a window slot (row-major over the axes).
std::array<int, kMaxRank> slot_offsets(const Neighborhood& nb, int slot) {
  std::array<int, kMaxRank> o{};
  for (int a = kMaxRank - 1; a >= 0; --a) {
    o[a] = slot % nb.axis[a].kernel;
    slot /= nb.axis[a].kernel;
  }
  return o;
}

Problem random_cpu_problem(int seed) {
  std::mt19937_64 rng(91000 + seed);
  testing::RandomOptions o;
  o.rank = 1 + seed % 3;
  o.dtype = DType::kFloat32;
  o.allow_periodic = true;
  return testing::random_problem(rng, o);
}

TEST(NaiveIndexing, WindowSlotsHoldTheSpecNeighborsInOrder) {
  for (int seed = 0; seed < 150; ++seed) {
    const Problem p = random_cpu_problem(seed);
    SCOPED_TRACE(p.to_string());
    const Neighborhood nb = p.neighborhood();
    const auto axes = spec_axes(nb);
    int failures = 0;
    for_each_grid_token(nb, [&](const int* query) {
      const auto lists = spec_lists(axes, query);
      const Neighborhood::Windows w = nb.windows(query);
      int expected_slot = 0;
      std::vector<int> valid_slots;
      cuda::naive::for_each_window_slot(nb, w, [&](int slot, const int* key, bool valid) {
        const auto o = slot_offsets(nb, slot);
        bool expected_valid = true;
        for (int a = 0; a < kMaxRank; ++a) expected_valid = expected_valid && o[a] < int(lists[a].size());
        bool ok = slot == expected_slot++ && valid == expected_valid;
        for (int a = 0; ok && valid && a < kMaxRank; ++a) ok = key[a] == lists[a][o[a]];
        if (valid) valid_slots.push_back(slot);
        if (!ok && failures++ < 5)
          ADD_FAILURE() << "query (" << query[0] << "," << query[1] << "," << query[2] << ") slot " << slot;
      });
      if (expected_slot != cuda::naive::window_slots(nb) && failures++ < 5) ADD_FAILURE() << "slot count";
      std::vector<int> neighbor_slots;
      cuda::naive::for_each_neighbor(nb, w, [&](int slot, const int* key) {
        const auto o = slot_offsets(nb, slot);
        for (int a = 0; a < kMaxRank; ++a)
          if ((o[a] >= int(lists[a].size()) || key[a] != lists[a][o[a]]) && failures++ < 5)
            ADD_FAILURE() << "for_each_neighbor: query (" << query[0] << "," << query[1] << "," << query[2]
                          << ") slot " << slot;
        neighbor_slots.push_back(slot);
      });
      if (neighbor_slots != valid_slots && failures++ < 5) ADD_FAILURE() << "for_each_neighbor slots differ";
    });
    ASSERT_EQ(failures, 0);
  }
}

TEST(NaiveIndexing, InverseNeighborsAreExactlyTheQueriesThatSeeTheKey) {
  for (int seed = 0; seed < 150; ++seed) {
    const Problem p = random_cpu_problem(seed);
    SCOPED_TRACE(p.to_string());
    const Neighborhood nb = p.neighborhood();
    const auto axes = spec_axes(nb);
    const int64_t n = int64_t(nb.axis[0].length) * nb.axis[1].length * nb.axis[2].length;
    // expected[key] = (query, slot) pairs from the spec's neighbor lists.
    std::vector<std::vector<std::pair<int64_t, int>>> expected(n);
    for_each_grid_token(nb, [&](const int* query) {
      const auto lists = spec_lists(axes, query);
      for (size_t i0 = 0; i0 < lists[0].size(); ++i0)
        for (size_t i1 = 0; i1 < lists[1].size(); ++i1)
          for (size_t i2 = 0; i2 < lists[2].size(); ++i2) {
            const int key[kMaxRank] = {lists[0][i0], lists[1][i1], lists[2][i2]};
            const int slot = int((i0 * nb.axis[1].kernel + i1) * nb.axis[2].kernel + i2);
            expected[flat_token(nb, key)].push_back({flat_token(nb, query), slot});
          }
    });
    int failures = 0;
    for_each_grid_token(nb, [&](const int* key) {
      std::vector<std::pair<int64_t, int>> got;
      cuda::naive::for_each_inverse_neighbor(nb, key, [&](const int* query, int slot) {
        got.push_back({flat_token(nb, query), slot});
      });
      std::vector<std::pair<int64_t, int>> want = expected[flat_token(nb, key)];
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      if (got != want && failures++ < 5)
        ADD_FAILURE() << "key (" << key[0] << "," << key[1] << "," << key[2] << "): " << got.size()
                      << " (query, slot) pairs, the spec has " << want.size();
    });
    ASSERT_EQ(failures, 0);
  }
}

TEST(NaiveIndexing, RpbSlotIsTheSlotAtThatRelativePosition) {
  for (int seed = 0; seed < 100; ++seed) {
    const Problem p = random_cpu_problem(seed);
    SCOPED_TRACE(p.to_string());
    const Neighborhood nb = p.neighborhood();
    const auto axes = spec_axes(nb);
    int failures = 0;
    for_each_grid_token(nb, [&](const int* query) {
      const auto lists = spec_lists(axes, query);
      for (int d0 = 0; d0 < 2 * nb.axis[0].kernel - 1; ++d0)
        for (int d1 = 0; d1 < 2 * nb.axis[1].kernel - 1; ++d1)
          for (int d2 = 0; d2 < 2 * nb.axis[2].kernel - 1; ++d2) {
            const int delta[kMaxRank] = {d0, d1, d2};
            int want = 0;
            for (int a = 0; a < kMaxRank && want >= 0; ++a) {
              int pos = -1;
              for (size_t i = 0; i < lists[a].size(); ++i)
                if (testing::spec_axis_delta(axes[a], query[a], lists[a][i]) == delta[a]) pos = int(i);
              want = pos < 0 ? -1 : want * nb.axis[a].kernel + pos;
            }
            const int got = cuda::naive::rpb_slot(nb, query, delta);
            if (got != want && failures++ < 5)
              ADD_FAILURE() << "query (" << query[0] << "," << query[1] << "," << query[2] << ") delta (" << d0 << ","
                            << d1 << "," << d2 << "): " << got << ", expected " << want;
          }
    });
    ASSERT_EQ(failures, 0);
  }
}

TEST(NaiveIndexing, RowsDecodeInMemoryOrder) {
  Problem p;
  p.rank = 3;
  p.extent = {3, 5, 7};
  p.kernel = {1, 1, 1};
  const Neighborhood nb = p.neighborhood();
  const cuda::naive::TokenBox grid = cuda::naive::whole_grid(nb);
  const int64_t tokens = 105, heads = 6, batch = 4;
  ASSERT_EQ(grid.tokens(), tokens);
  for (int64_t row = 0; row < batch * tokens * heads; ++row) {
    const cuda::naive::RowIndex r = cuda::naive::decode_row(row, grid, heads);
    ASSERT_EQ((r.batch * tokens + flat_token(nb, r.token)) * heads + r.head, row);
    for (int a = 0; a < kMaxRank; ++a) {
      ASSERT_TRUE(r.token[a] >= 0 && r.token[a] < nb.axis[a].length);
      ASSERT_EQ(r.box_token[a], r.token[a]);
    }
  }
  // A query sub-box: rows walk its tokens, box_token counts from its corner.
  p.query_begin = {1, 2, 3};
  p.query_end = {3, 5, 4};
  const cuda::naive::TokenBox box = cuda::naive::query_box(p);
  ASSERT_EQ(box.tokens(), 2 * 3 * 1);
  for (int64_t row = 0; row < batch * box.tokens() * heads; ++row) {
    const cuda::naive::RowIndex r = cuda::naive::decode_row(row, box, heads);
    const int64_t flat = (r.box_token[0] * 3 + r.box_token[1]) * 1 + r.box_token[2];
    ASSERT_EQ((r.batch * box.tokens() + flat) * heads + r.head, row);
    ASSERT_TRUE(box.contains(r.token));
    for (int a = 0; a < kMaxRank; ++a) ASSERT_EQ(r.token[a], box.begin[a] + r.box_token[a]);
  }
  // Past 2^32 the division takes its 64-bit path.
  p = Problem{};
  p.rank = 3;
  p.extent = {1, 1024, 1024};
  p.kernel = {1, 1, 1};
  const Neighborhood big = p.neighborhood();
  for (int64_t row : {(int64_t(1) << 32) - 1, int64_t(1) << 32, (int64_t(1) << 32) + 12345, int64_t(1) << 40}) {
    const cuda::naive::RowIndex r = cuda::naive::decode_row(row, cuda::naive::whole_grid(big), 8);
    ASSERT_EQ((r.batch * (1 << 20) + flat_token(big, r.token)) * 8 + r.head, row);
  }
  // next_token walks the box row-major and wraps after the last token.
  int token[kMaxRank] = {0, 0, 0};
  for (int64_t t = 1; t <= tokens; ++t) {
    const bool wrapped = cuda::naive::next_token(token, grid);
    ASSERT_EQ(wrapped, t == tokens);
    ASSERT_EQ(flat_token(nb, token), t % tokens);
  }
}

TEST(NaivePlan, LanesAndSplits) {
  using cuda::naive::lanes_for;
  EXPECT_EQ(lanes_for(1), 1);
  EXPECT_EQ(lanes_for(3), 4);
  EXPECT_EQ(lanes_for(4), 4);
  EXPECT_EQ(lanes_for(5), 8);
  EXPECT_EQ(lanes_for(32), 32);
  EXPECT_EQ(lanes_for(33), 32);
  for (auto [items, outputs] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {63, 5}, {64, 5}, {65, 5}, {200704, 676}, {1 << 30, 1}, {1000, int64_t(1) << 30}}) {
    const cuda::naive::Split s = cuda::naive::plan_split(items, outputs);
    EXPECT_GE(s.splits, 1);
    EXPECT_GE(s.splits * s.per_split, items) << items << " " << outputs;
    EXPECT_LT((s.splits - 1) * s.per_split, items) << items << " " << outputs;
    EXPECT_LE(s.splits * outputs, std::max<int64_t>(1 << 22, outputs)) << items << " " << outputs;
  }
}

TEST(NaivePlan, VectorizedOnlyWhenEveryRowStartsOn16Bytes) {
  using cuda::naive::rows_vectorizable;
  void* aligned = reinterpret_cast<void*>(uintptr_t(0x10000));
  void* misaligned = reinterpret_cast<void*>(uintptr_t(0x10002));
  EXPECT_TRUE(rows_vectorizable(TensorRef{}));
  EXPECT_TRUE(rows_vectorizable(TensorRef::contiguous(aligned, DType::kFloat16, Device::kCUDA, {2, 5, 4, 32})));
  EXPECT_TRUE(rows_vectorizable(TensorRef::contiguous(aligned, DType::kFloat32, Device::kCUDA, {2, 5, 3, 8})));
  EXPECT_FALSE(rows_vectorizable(TensorRef::contiguous(misaligned, DType::kFloat16, Device::kCUDA, {2, 5, 4, 32})));
  EXPECT_FALSE(rows_vectorizable(TensorRef::contiguous(aligned, DType::kFloat16, Device::kCUDA, {2, 5, 4, 12})));
  TensorRef t = TensorRef::contiguous(aligned, DType::kFloat16, Device::kCUDA, {1, 5, 4, 16});
  t.stride[0] = 7;  // a dimension of size 1 never moves the pointer
  EXPECT_TRUE(rows_vectorizable(t));
  t.stride[1] = 68;  // 136 bytes: rows of token 1 start off 16 bytes
  EXPECT_FALSE(rows_vectorizable(t));
  t = TensorRef::contiguous(aligned, DType::kFloat32, Device::kCUDA, {2, 5, 4, 16});
  t.stride[3] = 2;
  EXPECT_FALSE(rows_vectorizable(t));
}

TEST(NaivePlan, WorkspaceBytes) {
  Problem p;
  p.rank = 2;
  p.extent = {56, 56};
  p.kernel = {7, 7};
  p.batch = 64;
  p.heads = 4;
  p.kv_heads = 4;
  p.dim = 32;
  int64_t bytes = 0;
  ASSERT_TRUE(cuda::naive::weight_bytes(p, &bytes));
  EXPECT_EQ(bytes, int64_t(64) * 56 * 56 * 4 * 49 * 4);  // 157 MB: the NAT anchor (docs/naive.md)
  p.rank = 1;
  p.extent = {int64_t(1) << 30, 0, 0};
  p.kernel = {int64_t(1) << 20, 0, 0};
  p.batch = int64_t(1) << 20;
  EXPECT_FALSE(cuda::naive::weight_bytes(p, &bytes));  // 2^70 slots
}

TEST(NaiveErrors, Float64IsRejectedBeforeTouchingTheDevice) {
  NBHD_REQUIRE_NAIVE();
  Problem p;
  p.rank = 1;
  p.extent = {8, 0, 0};
  p.kernel = {3, 0, 0};
  p.dim = 4;
  p.dtype = DType::kFloat64;
  // Host memory labelled as device memory: the backend must refuse before using it.
  HostTensor q(p.dtype, {1, 8, 1, 4}), out(p.dtype, {1, 8, 1, 4});
  TensorRef qd = q.ref(), od = out.ref();
  qd.device = od.device = Device::kCUDA;
  const Status s = forward(p, {qd, qd, qd, {}, {}, {}, od, {}}, naive_options());
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("float64"), std::string::npos) << s.message();
}

// ============================================================================
// GPU: the backend against the CPU reference
// ============================================================================

// The reference inputs in float64 (the exact answer on the inputs as stored).
struct Inputs64 {
  HostTensor q, k, v, rpb, ak, av;
  Inputs64(const Inputs& in, const TensorRef& rpb_used)
      : q(convert(in.q.ref(), DType::kFloat64)),
        k(convert(in.k.ref(), DType::kFloat64)),
        v(convert(in.v.ref(), DType::kFloat64)),
        rpb(convert(rpb_used, DType::kFloat64)),
        ak(convert(in.ak.ref(), DType::kFloat64)),
        av(convert(in.av.ref(), DType::kFloat64)) {}
};

Problem as_float64(Problem p) {
  p.dtype = DType::kFloat64;
  return p;
}

// Forward through nbhd::forward (backend naive) against the reference. With
// `rpb_float32` the bias is passed as float32 (allowed whatever the dtype).
void check_forward(const Problem& p, const Inputs& in, int64_t gap, bool rpb_float32 = false) {
  SCOPED_TRACE("forward, gap " + std::to_string(gap) + (rpb_float32 ? ", float32 rpb" : ""));
  const HostTensor rpb32 = rpb_float32 ? convert(in.rpb.ref(), DType::kFloat32) : HostTensor();
  const HostTensor& rpb = rpb_float32 ? rpb32 : in.rpb;
  const auto q_shape = shape_of(in.q.ref());
  HostTensor out = poisoned(p.dtype, with_last(q_shape, p.value_dim()), gap);
  HostTensor lse = poisoned(DType::kFloat32, without_last(q_shape), gap);
  {
    DeviceTensor q(in.q), k(in.k), v(in.v), b(rpb), ak(in.ak), av(in.av), o(out), l(lse);
    const Status s = forward(p, {q.ref(), k.ref(), v.ref(), b.ref(), ak.ref(), av.ref(), o.ref(), l.ref()}, naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    o.copy_to(out);
    l.copy_to(lse);
  }
  const Inputs64 in64(in, rpb.ref());
  HostTensor exact(DType::kFloat64, shape_of(out.ref())), exact_lse(DType::kFloat32, shape_of(lse.ref()));
  ASSERT_TRUE(cpu::reference_forward(as_float64(p),
                                     {in64.q.ref(), in64.k.ref(), in64.v.ref(), in64.rpb.ref(), in64.ak.ref(),
                                      in64.av.ref(), exact.ref(), exact_lse.ref()},
                                     false)
                  .ok());
  HostTensor plain(p.dtype, shape_of(out.ref()));
  ASSERT_TRUE(cpu::reference_forward(p,
                                     {in.q.ref(), in.k.ref(), in.v.ref(), rpb.ref(), in.ak.ref(), in.av.ref(),
                                      plain.ref(), TensorRef{}},
                                     /*plain_low_precision=*/true)
                  .ok());
  testing::expect_close("out", p.dtype, out.values(), exact.values(), plain.values());
  testing::expect_near("lse", lse.values(), exact_lse.values(), 1e-4, 1e-5);
}

// Backward through nbhd::backward (backend naive) against the float64 reference.
void check_backward(const Problem& p, const Inputs& in, int64_t gap, std::mt19937_64& rng) {
  // Half the calls' loss uses lse too: its gradient folds into the softmax backward.
  const bool lse_gradient = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
  SCOPED_TRACE("backward, gap " + std::to_string(gap) + (lse_gradient ? ", with lse's gradient" : ""));
  const bool extra = p.additional_tokens > 0;
  const auto q_shape = shape_of(in.q.ref()), out_shape = with_last(q_shape, p.value_dim());
  HostTensor d_out(p.dtype, out_shape, gap);
  d_out.fill_random(rng);
  HostTensor d_lse = lse_gradient ? HostTensor(DType::kFloat32, without_last(q_shape)) : HostTensor();
  if (lse_gradient) d_lse.fill_random(rng);
  // out and lse are inputs the naive backward does not read (it recomputes the
  // probabilities); the API requires them.
  HostTensor out(p.dtype, out_shape), lse(DType::kFloat32, without_last(q_shape));
  HostTensor dq = poisoned(p.dtype, q_shape, gap), dk = poisoned(p.dtype, shape_of(in.k.ref()), gap),
             dv = poisoned(p.dtype, shape_of(in.v.ref()), gap);
  HostTensor drpb = p.has_rpb ? poisoned(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
  HostTensor dak = extra ? poisoned(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
  HostTensor dav = extra ? poisoned(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
  {
    DeviceTensor q(in.q), k(in.k), v(in.v), b(in.rpb), ak(in.ak), av(in.av), o(out), l(lse), g(d_out), gl(d_lse);
    DeviceTensor gq(dq), gk(dk), gv(dv), gb(drpb), gak(dak), gav(dav);
    BackwardTensors t;
    t.query = q.ref();
    t.key = k.ref();
    t.value = v.ref();
    t.rpb = b.ref();
    t.additional_keys = ak.ref();
    t.additional_values = av.ref();
    t.out = o.ref();
    t.lse = l.ref();
    t.d_out = g.ref();
    t.d_query = gq.ref();
    t.d_key = gk.ref();
    t.d_value = gv.ref();
    t.d_rpb = gb.ref();
    t.d_additional_keys = gak.ref();
    t.d_additional_values = gav.ref();
    t.d_lse = gl.ref();
    const Status s = backward(p, t, naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    gq.copy_to(dq);
    gk.copy_to(dk);
    gv.copy_to(dv);
    gb.copy_to(drpb);
    gak.copy_to(dak);
    gav.copy_to(dav);
  }
  const Problem p64 = as_float64(p);
  const Inputs64 in64(in, in.rpb.ref());
  const HostTensor d_out64 = convert(d_out.ref(), DType::kFloat64);
  const HostTensor d_lse64 = lse_gradient ? convert(d_lse.ref(), DType::kFloat64) : HostTensor();
  HostTensor eq(DType::kFloat64, q_shape), ek(DType::kFloat64, shape_of(in.k.ref())),
      ev(DType::kFloat64, shape_of(in.v.ref()));
  HostTensor erpb = p.has_rpb ? HostTensor(DType::kFloat64, shape_of(in.rpb.ref())) : HostTensor();
  HostTensor eak = extra ? HostTensor(DType::kFloat64, shape_of(in.ak.ref())) : HostTensor();
  HostTensor eav = extra ? HostTensor(DType::kFloat64, shape_of(in.av.ref())) : HostTensor();
  BackwardTensors r;
  r.query = in64.q.ref();
  r.key = in64.k.ref();
  r.value = in64.v.ref();
  r.rpb = in64.rpb.ref();
  r.additional_keys = in64.ak.ref();
  r.additional_values = in64.av.ref();
  r.d_out = d_out64.ref();
  r.d_query = eq.ref();
  r.d_key = ek.ref();
  r.d_value = ev.ref();
  r.d_rpb = erpb.ref();
  r.d_additional_keys = eak.ref();
  r.d_additional_values = eav.ref();
  r.d_lse = d_lse64.ref();
  ASSERT_TRUE(cpu::reference_backward(p64, r).ok());
  const double rtol = p.dtype == DType::kFloat32 ? 1e-4 : two_ulps(p.dtype);
  expect_match("d query", dq.values(), eq.values(), rtol, 1e-4);
  expect_match("d key", dk.values(), ek.values(), rtol, 1e-4);
  expect_match("d value", dv.values(), ev.values(), rtol, 1e-4);
  if (p.has_rpb) expect_match("d rpb", drpb.values(), erpb.values(), 1e-4, 1e-4);
  if (extra) {
    expect_match("d additional_keys", dak.values(), eak.values(), rtol, 1e-4);
    expect_match("d additional_values", dav.values(), eav.values(), rtol, 1e-4);
  }
}

// Every unfused operation against the reference's, on the same inputs in the dtype.
void check_unfused(const Problem& p, const Inputs& in, int64_t gap, std::mt19937_64& rng) {
  SCOPED_TRACE("unfused, gap " + std::to_string(gap));
  const bool extra = p.additional_tokens > 0;
  const double rtol = two_ulps(p.dtype);
  const auto q_shape = shape_of(in.q.ref());
  const auto attn_shape = with_last(q_shape, p.window_size() + p.additional_tokens);
  const auto out_shape = with_last(q_shape, p.value_dim());
  const Options o = naive_options();

  // qk
  HostTensor scores(p.dtype, attn_shape, gap);
  ASSERT_TRUE(cpu::reference_qk(p, {in.q.ref(), in.k.ref(), in.rpb.ref(), in.ak.ref(), scores.ref()}).ok());
  {
    HostTensor got = poisoned(p.dtype, attn_shape, gap);
    DeviceTensor q(in.q), k(in.k), b(in.rpb), ak(in.ak), a(got);
    const Status s = qk(p, {q.ref(), k.ref(), b.ref(), ak.ref(), a.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    a.copy_to(got);
    expect_match("qk", got.values(), scores.values(), rtol, 1e-5);
  }
  // softmax, out of place and in place, on the reference scores
  HostTensor probs(p.dtype, attn_shape, gap);
  ASSERT_TRUE(cpu::reference_softmax(p, {scores.ref(), probs.ref()}).ok());
  {
    HostTensor got = poisoned(p.dtype, attn_shape, gap), in_place(p.dtype, attn_shape, gap);
    DeviceTensor a(scores), out(got);
    Status s = softmax(p, {a.ref(), out.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    s = softmax(p, {a.ref(), a.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(got);
    a.copy_to(in_place);
    expect_match("softmax", got.values(), probs.values(), rtol, 1e-5);
    expect_match("softmax in place", in_place.values(), probs.values(), rtol, 1e-5);
  }
  // av on the reference probabilities
  {
    HostTensor want(p.dtype, out_shape, gap), got = poisoned(p.dtype, out_shape, gap);
    ASSERT_TRUE(cpu::reference_av(p, {probs.ref(), in.v.ref(), in.av.ref(), want.ref()}).ok());
    DeviceTensor a(probs), v(in.v), av(in.av), out(got);
    const Status s = nbhd::av(p, {a.ref(), v.ref(), av.ref(), out.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(got);
    expect_match("av", got.values(), want.values(), rtol, 1e-5);
  }
  // av backward
  {
    HostTensor d_out(p.dtype, out_shape, gap);
    d_out.fill_random(rng);
    HostTensor want_dp(p.dtype, attn_shape, gap), want_dv(p.dtype, shape_of(in.v.ref()), gap);
    HostTensor want_dav = extra ? HostTensor(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
    ASSERT_TRUE(cpu::reference_av_backward(p, {probs.ref(), in.v.ref(), in.av.ref(), d_out.ref(), want_dp.ref(),
                                               want_dv.ref(), want_dav.ref()})
                    .ok());
    HostTensor dp = poisoned(p.dtype, attn_shape, gap), dv = poisoned(p.dtype, shape_of(in.v.ref()), gap);
    HostTensor dav = extra ? poisoned(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
    DeviceTensor a(probs), v(in.v), av(in.av), g(d_out), gp(dp), gv(dv), gav(dav);
    const Status s = av_backward(p, {a.ref(), v.ref(), av.ref(), g.ref(), gp.ref(), gv.ref(), gav.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    gp.copy_to(dp);
    gv.copy_to(dv);
    gav.copy_to(dav);
    expect_match("av_backward d_probs", dp.values(), want_dp.values(), rtol, 1e-5);
    expect_match("av_backward d_value", dv.values(), want_dv.values(), rtol, 1e-5);
    if (extra) expect_match("av_backward d_additional_values", dav.values(), want_dav.values(), rtol, 1e-4);
  }
  // softmax backward, in place on d_probs
  {
    HostTensor d_probs(p.dtype, attn_shape, gap), want(p.dtype, attn_shape, gap), got(p.dtype, attn_shape, gap);
    d_probs.fill_random(rng);
    ASSERT_TRUE(cpu::reference_softmax_backward(p, {probs.ref(), d_probs.ref(), want.ref()}).ok());
    DeviceTensor a(probs), g(d_probs);
    const Status s = softmax_backward(p, {a.ref(), g.ref(), g.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    g.copy_to(got);
    expect_match("softmax_backward", got.values(), want.values(), rtol, 1e-5);
  }
  // qk backward; slots outside a causal window hold NaN, which must not be read
  {
    HostTensor d_attn(p.dtype, attn_shape, gap);
    d_attn.fill_random(rng);
    const std::vector<double> s_values = scores.values();
    for (int64_t i = 0; i < d_attn.numel(); ++i)
      if (std::isinf(s_values[i])) d_attn.set(i, kNaN);
    HostTensor want_dq(p.dtype, q_shape, gap), want_dk(p.dtype, shape_of(in.k.ref()), gap);
    HostTensor want_drpb = p.has_rpb ? HostTensor(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
    HostTensor want_dak = extra ? HostTensor(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
    ASSERT_TRUE(cpu::reference_qk_backward(p, {in.q.ref(), in.k.ref(), in.ak.ref(), d_attn.ref(), want_dq.ref(),
                                               want_dk.ref(), want_drpb.ref(), want_dak.ref()})
                    .ok());
    HostTensor dq = poisoned(p.dtype, q_shape, gap), dk = poisoned(p.dtype, shape_of(in.k.ref()), gap);
    HostTensor drpb = p.has_rpb ? poisoned(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
    HostTensor dak = extra ? poisoned(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
    DeviceTensor q(in.q), k(in.k), ak(in.ak), g(d_attn), gq(dq), gk(dk), gb(drpb), gak(dak);
    const Status s = qk_backward(p, {q.ref(), k.ref(), ak.ref(), g.ref(), gq.ref(), gk.ref(), gb.ref(), gak.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    gq.copy_to(dq);
    gk.copy_to(dk);
    gb.copy_to(drpb);
    gak.copy_to(dak);
    expect_match("qk_backward d_query", dq.values(), want_dq.values(), rtol, 1e-5);
    expect_match("qk_backward d_key", dk.values(), want_dk.values(), rtol, 1e-5);
    if (p.has_rpb) expect_match("qk_backward d_rpb", drpb.values(), want_drpb.values(), 1e-5, 1e-4);
    if (extra) expect_match("qk_backward d_additional_keys", dak.values(), want_dak.values(), rtol, 1e-4);
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// A problem from its parameters (the first `rank` entries of each array are used).
Problem make_problem(int rank, std::array<int64_t, 3> extent, std::array<int64_t, 3> kernel,
                     std::array<int64_t, 3> dilation, std::array<int64_t, 3> stride, std::array<bool, 3> causal,
                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t dim_v, int64_t extra, bool rpb,
                     DType dtype) {
  Problem p;
  p.rank = rank;
  p.extent = extent;
  p.kernel = kernel;
  p.dilation = dilation;
  p.stride = stride;
  p.causal = causal;
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.dim = dim;
  p.dim_v = dim_v;
  p.additional_tokens = extra;
  p.has_rpb = rpb;
  p.dtype = dtype;
  return p;
}

// Problems the random ones rarely reach: 16-byte vector paths (head dims that are
// multiples of 8, packed tensors), head dims past 8 x 32 lanes (several chunks per
// lane), full and blocked attention, many rows (grid-stride loops).
std::vector<Problem> handpicked(DType dtype) {
  std::vector<Problem> v;
  v.push_back(make_problem(2, {23, 19, 0}, {7, 5, 0}, {2, 1, 1}, {1, 2, 1}, {false, true, false}, 2, 4, 2, 32, 16, 3,
                           true, dtype));
  v.push_back(make_problem(1, {50, 0, 0}, {9, 0, 0}, {3, 1, 1}, {2, 1, 1}, {}, 1, 2, 1, 264, 8, 2, true, dtype));
  v.push_back(make_problem(1, {31, 0, 0}, {5, 0, 0}, {1, 1, 1}, {5, 1, 1}, {true, false, false}, 1, 1, 1, 270, 300, 0,
                           false, dtype));
  v.push_back(make_problem(3, {5, 7, 9}, {3, 3, 5}, {1, 2, 1}, {1, 3, 2}, {true, false, false}, 1, 3, 1, 16, 24, 1,
                           true, dtype));
  v.push_back(make_problem(2, {40, 33, 0}, {7, 9, 0}, {2, 3, 1}, {1, 1, 1}, {}, 2, 4, 2, 32, 32, 2, true, dtype));
  v.push_back(make_problem(1, {64, 0, 0}, {64, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 2, 2, 8, 8, 0, false, dtype));
  v.push_back(make_problem(2, {12, 12, 0}, {4, 4, 0}, {1, 1, 1}, {4, 4, 1}, {}, 1, 2, 1, 8, 8, 0, true, dtype));
  v.push_back(make_problem(1, {10, 0, 0}, {3, 0, 0}, {1, 1, 1}, {1, 1, 1}, {true, false, false}, 1, 1, 1, 1, 1, 1,
                           true, dtype));
  return v;
}

const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

std::string dtype_label(DType t) { return name(t); }

// ---- small problems for compute-sanitizer (scripts/gpu-check runs NaiveSmoke.*)

TEST(NaiveSmoke, EveryOperationOnSmallProblems) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  for (DType dtype : kDtypes) {
    // Scalar path (head dim 5), causal, dilation, stride, GQA, additional tokens, rpb,
    // 3 batches (the d rpb splits cross a batch); and the 16-byte path (head dims 16
    // and 24, packed: 2 and 4 lanes, one idle), 7 slots (a partial last batch of 2).
    const Problem problems[] = {
        make_problem(2, {7, 6, 0}, {3, 4, 0}, {2, 1, 1}, {1, 2, 1}, {true, false, false}, 3, 4, 2, 5, 3, 2, true,
                     dtype),
        make_problem(1, {19, 0, 0}, {5, 0, 0}, {1, 1, 1}, {2, 1, 1}, {}, 1, 2, 1, 16, 24, 2, true, dtype)};
    for (const Problem& p : problems) {
      SCOPED_TRACE(p.to_string());
      std::mt19937_64 rng(17);
      const Inputs in(p, rng);
      check_forward(p, in, 0);
      check_backward(p, in, 0, rng);
      check_unfused(p, in, 0, rng);
    }
  }
}

// ---- random problems

// Random problems whose axes are sometimes periodic (alone or with dilation, stride,
// rpb, GQA and additional tokens).
Problem random_periodic_or_not(std::mt19937_64& rng, int rank, DType dtype) {
  testing::RandomOptions o{rank, dtype};
  o.allow_periodic = true;
  return testing::random_problem(rng, o);
}

class NaiveRandom : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(NaiveRandom, Forward) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 12; ++seed) {
    std::mt19937_64 rng(100000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_periodic_or_not(rng, rank, dtype);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = seed % 3 == 0 ? 3 : 0;
    const Inputs in(p, rng, gap);
    check_forward(p, in, gap, /*rpb_float32=*/p.has_rpb && seed % 3 == 1);
  }
}

TEST_P(NaiveRandom, Backward) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 8; ++seed) {
    std::mt19937_64 rng(200000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_periodic_or_not(rng, rank, dtype);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = seed % 3 == 0 ? 2 : 0;
    const Inputs in(p, rng, gap);
    check_backward(p, in, gap, rng);
  }
}

// A query sub-box (the distributed path's halo problems): forward and backward
// against the reference on the same box, which the reference computes from the
// spec's definition (its rows are the box's queries; dk, dv, d rpb sum over them).
TEST_P(NaiveRandom, QuerySubBox) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  const auto [rank, dtype] = GetParam();
  int boxed = 0;
  for (int seed = 0; seed < 8; ++seed) {
    std::mt19937_64 rng(250000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = testing::with_random_box(random_periodic_or_not(rng, rank, dtype), rng);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    boxed += p.has_query_box();
    const int64_t gap = seed % 3 == 0 ? 2 : 0;
    const Inputs in(p, rng, gap);
    check_forward(p, in, gap);
    check_backward(p, in, gap, rng);
  }
  EXPECT_GE(boxed, 4) << "the seeds drew too few sub-boxes";
}

TEST_P(NaiveRandom, UnfusedOperations) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 6; ++seed) {
    std::mt19937_64 rng(300000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_periodic_or_not(rng, rank, dtype);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = seed % 2 == 0 ? 1 : 0;
    const Inputs in(p, rng, gap);
    check_unfused(p, in, gap, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(RanksAndDtypes, NaiveRandom,
                         ::testing::Combine(::testing::Values(1, 2, 3), ::testing::ValuesIn(kDtypes)),
                         [](const auto& info) {
                           return "rank" + std::to_string(std::get<0>(info.param)) + "_" +
                                  dtype_label(std::get<1>(info.param));
                         });

// ---- hand-picked problems

class NaiveHandpicked : public ::testing::TestWithParam<DType> {};

TEST_P(NaiveHandpicked, ForwardBackwardUnfused) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  for (const Problem& p : handpicked(GetParam())) {
    SCOPED_TRACE(p.to_string());
    std::mt19937_64 rng(4242);
    const Inputs in(p, rng);
    check_forward(p, in, 0);
    check_forward(p, in, 0, /*rpb_float32=*/p.has_rpb);
    check_backward(p, in, 0, rng);
    check_unfused(p, in, 0, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, NaiveHandpicked, ::testing::ValuesIn(kDtypes),
                         [](const auto& info) { return dtype_label(info.param); });

// The last dimension of q, v and out with a stride other than 1 (views of [.., D, H]
// storage): the kernels' scalar path with an inner stride.
TEST(NaiveLayouts, TransposedHeadDims) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  for (DType dtype : kDtypes) {
    const Problem p = make_problem(2, {9, 7, 0}, {3, 5, 0}, {1, 1, 1}, {1, 2, 1}, {}, 2, 3, 3, 10, 6, 0, false, dtype);
    SCOPED_TRACE(p.to_string());
    std::mt19937_64 rng(7);
    const Inputs in(p, rng);  // k from here; q, v, out transposed below
    HostTensor q_store(dtype, {2, 9, 7, 10, 3}), v_store(dtype, {2, 9, 7, 6, 3});
    HostTensor out_store = poisoned(dtype, {2, 9, 7, 6, 3}, 0);
    q_store.fill_random(rng);
    v_store.fill_random(rng);
    auto transposed = [](TensorRef t) {  // [.., a, b] -> [.., b, a] view
      std::swap(t.shape[t.ndim - 1], t.shape[t.ndim - 2]);
      std::swap(t.stride[t.ndim - 1], t.stride[t.ndim - 2]);
      return t;
    };
    DeviceTensor q(q_store), k(in.k), v(v_store), out(out_store);
    const Status s = forward(p, {transposed(q.ref()), k.ref(), transposed(v.ref()), {}, {}, {}, transposed(out.ref()), {}},
                             naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(out_store);
    const HostTensor got = convert(transposed(out_store.ref()), DType::kFloat64);
    const HostTensor q64 = convert(transposed(q_store.ref()), DType::kFloat64),
                     k64 = convert(in.k.ref(), DType::kFloat64), v64 = convert(transposed(v_store.ref()), DType::kFloat64);
    HostTensor exact(DType::kFloat64, shape_of(got.ref())), plain(dtype, shape_of(got.ref()));
    ASSERT_TRUE(cpu::reference_forward(as_float64(p), {q64.ref(), k64.ref(), v64.ref(), {}, {}, {}, exact.ref(), {}}, false)
                    .ok());
    ASSERT_TRUE(cpu::reference_forward(
                    p, {transposed(q_store.ref()), in.k.ref(), transposed(v_store.ref()), {}, {}, {}, plain.ref(), {}}, true)
                    .ok());
    testing::expect_close("out", dtype, got.values(), exact.values(), plain.values());
  }
}

// ---- more than 2^31 elements in one tensor

// Device memory for the large test.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) { EXPECT_EQ(cudaMalloc(&data_, bytes), cudaSuccess) << bytes << " bytes"; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

// Element i of a filled tensor is pattern[i % kPeriod]. The period is odd, so it
// does not divide 2^32: an offset that wrapped at 32 bits reads another value.
constexpr int64_t kPeriod = (int64_t(1) << 24) - 3;

std::vector<half_bits> make_pattern(uint64_t seed) {
  std::vector<half_bits> v(kPeriod);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull;
  for (half_bits& e : v) {  // splitmix64 -> uniform in [-1, 1)
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    e = to_half(float(double(z >> 11) * 0x1.0p-52 - 1.0));
  }
  return v;
}

void fill(const DeviceBuffer& buffer, int64_t n, const std::vector<half_bits>& pattern) {
  for (int64_t offset = 0; offset < n; offset += kPeriod)
    ASSERT_EQ(cudaMemcpy(static_cast<half_bits*>(buffer.get()) + offset, pattern.data(),
                         size_t(std::min(kPeriod, n - offset)) * sizeof(half_bits), cudaMemcpyHostToDevice),
              cudaSuccess);
}

double at(const std::vector<half_bits>& pattern, int64_t i) { return to_float(pattern[i % kPeriod]); }

// n elements of a float16 or float32 device buffer from `offset`, as doubles.
template <class T>
std::vector<double> read(const DeviceBuffer& buffer, int64_t offset, int64_t n) {
  std::vector<T> host(n);
  EXPECT_EQ(cudaMemcpy(host.data(), static_cast<const T*>(buffer.get()) + offset, n * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  std::vector<double> out;
  for (const T& e : host) {
    if constexpr (std::is_same_v<T, float>)
      out.push_back(e);
    else
      out.push_back(to_float(e));
  }
  return out;
}

TEST(NaiveLarge, MoreThan2Pow31Elements) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  // 1-D, L = 2^22 + 77 tokens, 8 query heads of dim 64 on one kv head (GQA), Dv = 8:
  // q and d q hold L * 512 = 2^31 + 39424 elements (4.3 GB each in float16); with a
  // 65-token window the forward's weights hold L * 8 * 65 = 2.2 * 10^9 floats.
  constexpr int64_t L = (int64_t(1) << 22) + 77, H = 8, D = 64, Dv = 8;
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  (void)total_bytes;
  if (free_bytes < size_t(16) << 30) GTEST_SKIP() << "needs 16 GiB of free GPU memory, has " << (free_bytes >> 20) << " MiB";

  auto problem = [&](int64_t kernel) {
    Problem p = make_problem(1, {L, 0, 0}, {kernel, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, H, 1, D, Dv, 0, false,
                             DType::kFloat16);
    p.scale = 0.5;
    return p;
  };
  const std::vector<half_bits> pq = make_pattern(1), pk = make_pattern(2), pv = make_pattern(3), pg = make_pattern(4);
  DeviceBuffer q(L * H * D * 2), k(L * D * 2), v(L * Dv * 2), out(L * H * Dv * 2), lse(L * H * 4);
  fill(q, L * H * D, pq);
  fill(k, L * D, pk);
  fill(v, L * Dv, pv);
  const TensorRef q_ref = TensorRef::contiguous(q.get(), DType::kFloat16, Device::kCUDA, {1, L, H, D});
  const TensorRef k_ref = TensorRef::contiguous(k.get(), DType::kFloat16, Device::kCUDA, {1, L, 1, D});
  const TensorRef v_ref = TensorRef::contiguous(v.get(), DType::kFloat16, Device::kCUDA, {1, L, 1, Dv});
  const TensorRef out_ref = TensorRef::contiguous(out.get(), DType::kFloat16, Device::kCUDA, {1, L, H, Dv});
  const TensorRef lse_ref = TensorRef::contiguous(lse.get(), DType::kFloat32, Device::kCUDA, {1, L, H});

  // The attention of one (query, head), in float64 from the patterns.
  struct Row {
    std::vector<int64_t> keys;
    std::vector<double> probs, d_scores;
    double lse;
  };
  auto row = [&](const Problem& p, int64_t t, int64_t h, bool with_grad) {
    const Axis ax{int(L), int(p.kernel[0]), 1, 1, false};
    const Range w = ax.window(int(t), int(L));
    Row r{};
    double mx = -1e300;
    std::vector<double> s;
    for (int j = w.begin; j < w.end; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += at(pq, (t * H + h) * D + d) * at(pk, j * D + d);
      r.keys.push_back(j);
      s.push_back(0.5 * dot);
      mx = std::max(mx, s.back());
    }
    double sum = 0;
    for (double x : s) sum += std::exp(x - mx);
    r.lse = mx + std::log(sum);
    for (double x : s) r.probs.push_back(std::exp(x - r.lse));
    if (with_grad) {
      std::vector<double> dp;
      double delta = 0;
      for (size_t i = 0; i < r.keys.size(); ++i) {
        double g = 0;
        for (int64_t d = 0; d < Dv; ++d) g += at(pg, (t * H + h) * Dv + d) * at(pv, r.keys[i] * Dv + d);
        dp.push_back(g);
        delta += r.probs[i] * g;
      }
      for (size_t i = 0; i < r.keys.size(); ++i) r.d_scores.push_back(r.probs[i] * (dp[i] - delta));
    }
    return r;
  };
  // float16 outputs: 2 ulps relative, plus 1e-3 of the largest value for the float32
  // arithmetic (a wrong key moves an output by ~1e-2 or more).
  auto expect_rows = [](const std::string& what, const std::vector<double>& got, const std::vector<double>& want) {
    double scale = 1e-2;
    for (double x : want) scale = std::max(scale, std::abs(x));
    expect_match(what, got, want, std::ldexp(1.0, -9), 1e-3 * scale);
  };
  const int64_t g22 = int64_t(1) << 22;  // first token whose q row starts past 2^31 elements
  const int64_t samples[] = {0, 1, 1000, L / 2, g22 - 1, g22, g22 + 1, L - 40, L - 2, L - 1};

  {  // forward, window 65
    SCOPED_TRACE("forward, window 65");
    const Problem p = problem(65);
    const Status s = forward(p, {q_ref, k_ref, v_ref, {}, {}, {}, out_ref, lse_ref}, naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (int64_t t : samples)
      for (int64_t h : {int64_t(0), int64_t(3), H - 1}) {
        SCOPED_TRACE("query " + std::to_string(t) + " head " + std::to_string(h));
        const Row r = row(p, t, h, false);
        std::vector<double> want(Dv, 0.0);
        for (size_t i = 0; i < r.keys.size(); ++i)
          for (int64_t d = 0; d < Dv; ++d) want[d] += r.probs[i] * at(pv, r.keys[i] * Dv + d);
        expect_rows("out", read<half_bits>(out, (t * H + h) * Dv, Dv), want);
        expect_match("lse", read<float>(lse, t * H + h, 1), {r.lse}, 1e-5, 1e-4);
      }
  }
  {  // forward and backward, window 3
    SCOPED_TRACE("backward, window 3");
    const Problem p = problem(3);
    Status s = forward(p, {q_ref, k_ref, v_ref, {}, {}, {}, out_ref, lse_ref}, naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    DeviceBuffer d_out(L * H * Dv * 2), dq(L * H * D * 2), dk(L * D * 2), dv(L * Dv * 2);
    fill(d_out, L * H * Dv, pg);
    BackwardTensors t;
    t.query = q_ref;
    t.key = k_ref;
    t.value = v_ref;
    t.out = out_ref;
    t.lse = lse_ref;
    t.d_out = TensorRef::contiguous(d_out.get(), DType::kFloat16, Device::kCUDA, {1, L, H, Dv});
    t.d_query = TensorRef::contiguous(dq.get(), DType::kFloat16, Device::kCUDA, {1, L, H, D});
    t.d_key = TensorRef::contiguous(dk.get(), DType::kFloat16, Device::kCUDA, {1, L, 1, D});
    t.d_value = TensorRef::contiguous(dv.get(), DType::kFloat16, Device::kCUDA, {1, L, 1, Dv});
    s = backward(p, t, naive_options());
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (int64_t tq : samples)
      for (int64_t h : {int64_t(0), H - 1}) {
        SCOPED_TRACE("d query " + std::to_string(tq) + " head " + std::to_string(h));
        const Row r = row(p, tq, h, true);
        std::vector<double> want(D, 0.0);
        for (size_t i = 0; i < r.keys.size(); ++i)
          for (int64_t d = 0; d < D; ++d) want[d] += 0.5 * r.d_scores[i] * at(pk, r.keys[i] * D + d);
        expect_rows("d query", read<half_bits>(dq, (tq * H + h) * D, D), want);
      }
    for (int64_t u : samples) {
      SCOPED_TRACE("d key / d value " + std::to_string(u));
      std::vector<double> want_k(D, 0.0), want_v(Dv, 0.0);
      for (int64_t tq = std::max<int64_t>(0, u - 3); tq <= std::min(L - 1, u + 3); ++tq)
        for (int64_t h = 0; h < H; ++h) {
          const Row r = row(p, tq, h, true);
          for (size_t i = 0; i < r.keys.size(); ++i) {
            if (r.keys[i] != u) continue;
            for (int64_t d = 0; d < D; ++d) want_k[d] += 0.5 * r.d_scores[i] * at(pq, (tq * H + h) * D + d);
            for (int64_t d = 0; d < Dv; ++d) want_v[d] += r.probs[i] * at(pg, (tq * H + h) * Dv + d);
          }
        }
      expect_rows("d key", read<half_bits>(dk, u * D, D), want_k);
      expect_rows("d value", read<half_bits>(dv, u * Dv, Dv), want_v);
    }
  }
}

// ---- errors

void* failing_allocate(std::size_t, void*) { return nullptr; }
void no_deallocate(void*, void*) {}

TEST(NaiveErrors, FailingAllocatorGivesOutOfMemory) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  const Problem p = make_problem(2, {9, 9, 0}, {3, 3, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 2, 2, 8, 8, 0, false,
                                 DType::kFloat16);
  std::mt19937_64 rng(5);
  const Inputs in(p, rng);
  HostTensor out(p.dtype, shape_of(in.q.ref()));
  DeviceTensor q(in.q), k(in.k), v(in.v), o(out);
  Options opt = naive_options();
  opt.allocator = {failing_allocate, no_deallocate, nullptr};
  const Status s = forward(p, {q.ref(), k.ref(), v.ref(), {}, {}, {}, o.ref(), {}}, opt);
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.message();
  EXPECT_NE(s.message().find("attention weights"), std::string::npos) << s.message();
  // The same through the backward, whose workspace holds two weight tensors.
  HostTensor lse(DType::kFloat32, without_last(shape_of(in.q.ref())));
  DeviceTensor l(lse), g(out), gq(out), gk(out), gv(out);
  BackwardTensors t;
  t.query = q.ref();
  t.key = k.ref();
  t.value = v.ref();
  t.out = o.ref();
  t.lse = l.ref();
  t.d_out = g.ref();
  t.d_query = gq.ref();
  t.d_key = gk.ref();
  t.d_value = gv.ref();
  EXPECT_EQ(backward(p, t, opt).code(), StatusCode::kOutOfMemory);
}

TEST(NaiveErrors, WorkspaceLargerThanTheGpuGivesOutOfMemory) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_NAIVE();
  // 2^20 tokens x 16 heads x a 8192-token window = 2^37 float32 weights (550 GB):
  // more than any GPU holds, while q, k, v and out take 0.6 GB.
  const int64_t L = int64_t(1) << 20;
  const Problem p = make_problem(1, {L, 0, 0}, {8192, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 16, 1, 8, 8, 0, false,
                                 DType::kFloat16);
  DeviceBuffer q(L * 16 * 8 * 2), kv(L * 8 * 2), out(L * 16 * 8 * 2);
  const TensorRef q_ref = TensorRef::contiguous(q.get(), p.dtype, Device::kCUDA, {1, L, 16, 8});
  const TensorRef kv_ref = TensorRef::contiguous(kv.get(), p.dtype, Device::kCUDA, {1, L, 1, 8});
  const TensorRef out_ref = TensorRef::contiguous(out.get(), p.dtype, Device::kCUDA, {1, L, 16, 8});
  const Status s = forward(p, {q_ref, kv_ref, kv_ref, {}, {}, {}, out_ref, {}}, naive_options());
  EXPECT_EQ(s.code(), StatusCode::kOutOfMemory) << s.message();
  EXPECT_NE(s.message().find(std::to_string(int64_t(1) << 39)), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("docs/naive.md"), std::string::npos) << s.message();
  // The failure left no error behind: a small problem still runs.
  const Problem small = make_problem(1, {16, 0, 0}, {3, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 8, 8, 0, false,
                                     DType::kFloat16);
  std::mt19937_64 rng(3);
  const Inputs in(small, rng);
  check_forward(small, in, 0);
}

}  // namespace
}  // namespace nbhd
