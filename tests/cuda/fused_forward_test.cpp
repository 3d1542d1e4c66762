// SPDX-License-Identifier: Apache-2.0
// The fused forward against the CPU reference on seeded random problems: ranks 1-3,
// extents that are not multiples of any tile, dilation with unequal groups, stride,
// every causal combination, periodic axes, GQA, Dv != D, additional tokens, RPB, head dims at the
// bucket edges, element offsets past 2^31; float16, bfloat16 and float32.
// Tolerance: the flash-attention rule (testing.hpp) against the reference run as a
// plain implementation in the same dtype; for float32, one whose products are the
// kernel's three tf32 products (cpu::PlainProducts::kTf32x3): the same math done
// plainly, so a kernel that loses a product term or rounds P or a partial sum to
// tf32 fails (each costs ~2^-11 relative against the plain 2^-21).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/reference.hpp"
#include "cuda/fused/host.hpp"
#include "cuda_testing.hpp"

namespace nbhd {
namespace {

using testing::built;
using testing::DeviceTensor;
using testing::HostTensor;
using testing::Inputs;

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }

struct Case {
  Problem p;
  int64_t gap;
};

Case random_case(std::mt19937_64& rng, int rank, DType dtype) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  testing::RandomOptions o;
  o.rank = rank;
  o.dtype = dtype;
  o.max_extent = rank == 1 ? 300 : rank == 2 ? 28 : 10;
  o.allow_periodic = true;  // the forward runs periodic axes (a key box that wraps)
  Case c{testing::random_problem(rng, o), 0};
  // Head dims: multiples of 16 bytes (8 halves, 4 floats), often at a bucket's edge
  // (32, 64, 128) or just past it; float32 stops at 128.
  const int64_t dims16[] = {8, 24, 32, 40, 64, 72, 128};
  const int64_t dims32[] = {4, 12, 32, 36, 64, 68, 124};
  const int64_t* dims = dtype == DType::kFloat32 ? dims32 : dims16;
  c.p.dim = dims[uniform(0, 6)];
  c.p.dim_v = uniform(0, 2) == 0 ? dims[uniform(0, 6)] : 0;
  c.p.heads = c.p.kv_heads * uniform(1, 3);
  // Padded strides (rows stay 16-byte aligned: the gap is 16 bytes).
  c.gap = uniform(0, 3) == 0 ? 16 / size_of(dtype) : 0;
  return c;
}

// Cases check_forward ran: a test none of whose cases this build can run (a filtered
// build: NBHD_DTYPES, NBHD_HEAD_DIMS) is skipped with the reason, not passed with
// nothing checked (SKIP_IF_NO_CASE_RAN at its end).
int cases_run = 0;
#define SKIP_IF_NO_CASE_RAN(before) \
  if (cases_run == (before)) GTEST_SKIP() << "no case of this test runs in this build (NBHD_DTYPES / NBHD_HEAD_DIMS)"

// A problem for the halo kernel's entry `c` (testing::small_window_problem, padded
// rows in a quarter), drawn again until the entry runs it (its key box fits shared
// memory).
Case small_window_case(std::mt19937_64& rng, int rank, const cuda::fused::TileConfig& c) {
  for (;;) {
    const Problem p = testing::small_window_problem(rng, rank, c.head_dim);
    if (cuda::fused::halo_refusal(p, c).empty())
      return Case{p, std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? 8 : 0};
  }
}

// Calls f(rank, entry) for every halo entry of the tile table (ranks 1-3, head dims
// 32 and 64), the entry forced through NBHD_FUSED_TILE while f runs; stops at the
// first failure.
template <class F>
void for_each_halo_entry(F&& f) {
  for (int rank = 1; rank <= 3; ++rank)
    for (int bucket : {32, 64}) {
      const auto configs = cuda::fused::candidate_configs(DType::kFloat16, rank, bucket, cuda::fused::hopper_device());
      for (size_t i = 0; i < configs.size(); ++i) {
        if (!configs[i].halo) continue;
        SCOPED_TRACE("rank " + std::to_string(rank) + " head dim " + std::to_string(bucket) + " config " +
                     std::to_string(i) + ": " + configs[i].why);
        setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
        f(rank, configs[i]);
        unsetenv("NBHD_FUSED_TILE");
        if (::testing::Test::HasFailure()) return;
      }
    }
}

// Index, in the candidate list of float16 `rank` at head dim `dim`, of the first
// warp-specialized wgmma entry (with `block_kv`-key tiles, 0: any), -1 where there is
// none. NBHD_FUSED_TILE takes it to force that entry.
int warp_specialized_entry(int rank, int dim, int block_kv = 0) {
  const auto configs = cuda::fused::candidate_configs(DType::kFloat16, rank, dim, /*hopper=*/true);
  for (size_t i = 0; i < configs.size(); ++i)
    if (configs[i].wgmma && configs[i].warps == 8 && (block_kv == 0 || configs[i].block_kv == block_kv))
      return int(i);
  return -1;
}

// Calls f(rank, bucket, entry) for every wgmma entry of the tile table with `warps`
// warps (0: any), ranks 1-3 and head dims 64, 128 and 256 (the warp-specialized
// kernel only), the entry forced through NBHD_FUSED_TILE while f runs; stops at the
// first failure. A build without a head dim has no entries for it.
template <class F>
void for_each_wgmma_entry(int warps, F&& f) {
  for (int rank = 1; rank <= 3; ++rank)
    for (int bucket : {64, 128, 256}) {
      const auto configs = cuda::fused::candidate_configs(DType::kFloat16, rank, bucket, /*hopper=*/true);
      for (size_t i = 0; i < configs.size(); ++i) {
        if (!configs[i].wgmma || (warps && configs[i].warps != warps)) continue;
        SCOPED_TRACE("rank " + std::to_string(rank) + " head dim " + std::to_string(bucket) + " config " +
                     std::to_string(i) + ": " + configs[i].why);
        setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
        f(rank, bucket, int(i));
        unsetenv("NBHD_FUSED_TILE");
        if (::testing::Test::HasFailure()) return;
      }
    }
}

// device >= 0: the tensors live on that GPU while the call is made with the caller's
// current device, which the call must leave as it was.
// loads: where given, how the kernel must load (forward_loads' first word, "TMA" or
// "cp.async"); out_values and lse_values: where given, receive what the kernel wrote.
void check_forward(const Case& c, std::mt19937_64& rng, int device = -1, const char* loads = nullptr,
                   std::vector<double>* out_values = nullptr, std::vector<double>* lse_values = nullptr) {
  const Problem& p = c.p;
  SCOPED_TRACE(p.to_string());
  const Status runnable = can_run(Backend::kFused, p, Device::kCUDA);
  if (!runnable.ok()) {
    // Only build filters may exclude a case; anything else is a bug in the test.
    ASSERT_NE(runnable.message().find("in this build"), std::string::npos) << runnable.message();
    return;
  }
  ++cases_run;
  const Inputs in(p, rng, c.gap);
  auto out_shape = shape_of(in.q.ref());
  out_shape.back() = p.value_dim();
  auto lse_shape = shape_of(in.q.ref());
  lse_shape.pop_back();
  HostTensor out(p.dtype, out_shape, c.gap), lse(DType::kFloat32, lse_shape);
  HostTensor ref_out(p.dtype, out_shape), ref_lse(DType::kFloat32, lse_shape), plain_out(p.dtype, out_shape);
  // Poison the output: every element must be written.
  for (int64_t i = 0; i < out.numel(); ++i) out.set(i, std::nan(""));

  ForwardTensors ref{in.q.ref(), in.k.ref(), in.v.ref(), in.rpb.ref(), in.ak.ref(), in.av.ref(), ref_out.ref(), ref_lse.ref()};
  ASSERT_TRUE(cpu::reference_forward(p, ref, false).ok());
  ref.out = plain_out.ref();
  ref.lse = TensorRef{};
  const auto products = p.dtype == DType::kFloat32 ? cpu::PlainProducts::kTf32x3 : cpu::PlainProducts::kExact;
  ASSERT_TRUE(cpu::reference_forward(p, ref, /*plain_low_precision=*/true, products).ok());
  // The exact answer: the reference on the same inputs in float64 is what
  // reference_forward computes before rounding; recover it by running on doubles.
  Problem p64 = p;
  p64.dtype = DType::kFloat64;
  Inputs in64(p64, rng);
  auto copy = [](const HostTensor& from, HostTensor& to) {
    for (int64_t i = 0; i < from.numel(); ++i) to.set(i, from.get(i));
  };
  copy(in.q, in64.q);
  copy(in.k, in64.k);
  copy(in.v, in64.v);
  if (p.has_rpb) copy(in.rpb, in64.rpb);
  if (p.additional_tokens) {
    copy(in.ak, in64.ak);
    copy(in.av, in64.av);
  }
  HostTensor exact(DType::kFloat64, out_shape);
  ASSERT_TRUE(cpu::reference_forward(p64, {in64.q.ref(), in64.k.ref(), in64.v.ref(), in64.rpb.ref(), in64.ak.ref(),
                                           in64.av.ref(), exact.ref(), TensorRef{}},
                                     false)
                  .ok());

  int caller = 0;
  ASSERT_EQ(cudaGetDevice(&caller), cudaSuccess);
  if (device >= 0) ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
  DeviceTensor q(in.q), k(in.k), v(in.v), rpb(in.rpb), ak(in.ak), av(in.av), d_out(out), d_lse(lse);
  ASSERT_EQ(cudaSetDevice(caller), cudaSuccess);
  Options o;
  o.backend = Backend::kFused;
  const ForwardTensors tensors{q.ref(), k.ref(), v.ref(), rpb.ref(), ak.ref(), av.ref(), d_out.ref(), d_lse.ref()};
  if (loads) ASSERT_EQ(cuda::fused::forward_loads(p, tensors).rfind(loads, 0), 0u) << cuda::fused::forward_loads(p, tensors);
  const Status s = forward(p, tensors, o);
  ASSERT_TRUE(s.ok()) << s.message();
  int current = -1;
  ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
  EXPECT_EQ(current, caller) << "the call changed the caller's current device";
  if (device >= 0) ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  d_out.copy_to(out);
  d_lse.copy_to(lse);
  ASSERT_EQ(cudaSetDevice(caller), cudaSuccess);
  if (out_values) *out_values = out.values();
  if (lse_values) *lse_values = lse.values();
  testing::expect_close("out", p.dtype, out.values(), exact.values(), plain_out.values());
  // lse: float32 in every dtype; its error is the scores' (16-bit inputs: 2^-8 of a
  // score; float32: ~2^-21).
  if (p.dtype == DType::kFloat32) testing::expect_near("lse", lse.values(), ref_lse.values(), 1e-4, 1e-5);
  else testing::expect_near("lse", lse.values(), ref_lse.values(), 2e-2, 1e-3);
}

// The halo kernel ran c (forced; a build without its dtype runs nothing).
void check_halo_forward(const Case& c, std::mt19937_64& rng) {
  if (can_run(Backend::kFused, c.p, Device::kCUDA).ok())
    ASSERT_TRUE(cuda::fused::forward_config(c.p).halo) << c.p.to_string() << ": the forced halo entry did not run";
  check_forward(c, rng);
}

class FusedForward : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(FusedForward, MatchesReference) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 24; ++seed) {
    std::mt19937_64 rng(9000 + 100 * rank + seed);
    Case c = random_case(rng, rank, dtype);
    if (seed % 4 == 3) c.p = testing::with_random_box(c.p, rng);  // a query sub-box, every dtype
    check_forward(c, rng);
    if (HasFatalFailure()) return;
  }
  SKIP_IF_NO_CASE_RAN(before);
}

INSTANTIATE_TEST_SUITE_P(All, FusedForward,
                         ::testing::Combine(::testing::Values(1, 2, 3),
                                            ::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32)),
                         [](const auto& info) {
                           return "rank" + std::to_string(std::get<0>(info.param)) + "_" + name(std::get<1>(info.param));
                         });

// A few small problems per rank: what compute-sanitizer runs (scripts/gpu-check).
TEST(FusedForwardSmoke, SmallProblems) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 3; ++seed) {
      std::mt19937_64 rng(30000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 90 : rank == 2 ? 12 : 6;
      Case c{testing::random_problem(rng, o), seed == 1 ? 8 : 0};
      // Head dim 32 runs the mma.sync kernels; 64 and 128 the wgmma ones on sm_90.
      c.p.dim = 32 << seed;
      c.p.dim_v = seed == 2 ? 16 : 0;
      check_forward(c, rng);
    }
  // The warp-specialized kernels with their TMA producer (NBHD_FUSED_LOADS=tma; dim = dim_v = 64), per rank.
  if (cuda::fused::hopper_device())
    for (int rank = 1; rank <= 3; ++rank) {
      const int i = warp_specialized_entry(rank, 64);
      ASSERT_GE(i, 0) << "no warp-specialized entry for rank " << rank;
      setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
      setenv("NBHD_FUSED_LOADS", "tma", 1);
      std::mt19937_64 rng(30200 + rank);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = DType::kFloat16;
      o.max_extent = rank == 1 ? 200 : rank == 2 ? 20 : 8;
      Case c{testing::random_problem(rng, o), 0};
      c.p.dim = 64;
      c.p.dim_v = 0;
      c.p.additional_tokens = 0;
      for (int a = 0; a < rank; ++a) c.p.dilation[a] = std::min<int64_t>(c.p.dilation[a], 4);
      check_forward(c, rng, -1, "TMA");
      unsetenv("NBHD_FUSED_LOADS");
      unsetenv("NBHD_FUSED_TILE");
    }
  // The warp-specialized kernels with 128-key tiles, their warpgroups taking turns
  // (NBHD_FUSED_SCHEDULE=pingpong; head dim 128), per rank: the sanitizers' check of
  // the turn barriers.
  if (cuda::fused::hopper_device())
    for (int rank = 1; rank <= 3; ++rank) {
      const int i = warp_specialized_entry(rank, 128, 128);
      ASSERT_GE(i, 0) << "no 128-key warp-specialized entry for rank " << rank;
      setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
      setenv("NBHD_FUSED_SCHEDULE", "pingpong", 1);
      std::mt19937_64 rng(30300 + rank);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = DType::kBFloat16;
      o.max_extent = rank == 1 ? 300 : rank == 2 ? 24 : 9;
      Case c{testing::random_problem(rng, o), 0};
      c.p.dim = 128;
      c.p.dim_v = 0;
      check_forward(c, rng);
      unsetenv("NBHD_FUSED_SCHEDULE");
      unsetenv("NBHD_FUSED_TILE");
    }
  // The halo kernels, one small-window problem per entry.
  for_each_halo_entry([&](int rank, const cuda::fused::TileConfig& config) {
    std::mt19937_64 rng(30400 + rank + config.head_dim + config.warps);
    check_halo_forward(small_window_case(rng, rank, config), rng);
  });
  // float32: the 64-key kernel (head dim 32) and the 32-key one (head dim 128).
  for (int rank = 1; rank <= 3; ++rank)
    for (int64_t dim : {32, 128}) {
      std::mt19937_64 rng(30100 + 10 * rank + dim);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = DType::kFloat32;
      o.max_extent = rank == 1 ? 90 : rank == 2 ? 12 : 6;
      Case c{testing::random_problem(rng, o), dim == 32 ? 4 : 0};
      c.p.dim = dim;
      c.p.dim_v = 0;
      check_forward(c, rng);
    }
  SKIP_IF_NO_CASE_RAN(before);
}

// The halo kernel (issue 20: small windows), every entry forced, on small-window
// problems of its rank and head-dim bucket (small_window_case), a query sub-box in
// every third; NAT's and DiNAT's shapes scaled down (7x7 windows, dilation 1 and 4,
// with rpb) once per 2-D entry.
TEST(FusedForwardHalo, SmallWindowsMatchReference) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  for_each_halo_entry([&](int rank, const cuda::fused::TileConfig& config) {
    for (int seed = 0; seed < 6; ++seed) {
      std::mt19937_64 rng(31000 + 1000 * rank + 100 * config.warps + config.head_dim + seed);
      Case c = small_window_case(rng, rank, config);
      if (seed % 3 == 2) c.p = testing::with_random_box(c.p, rng);
      check_halo_forward(c, rng);
      if (::testing::Test::HasFatalFailure()) return;
    }
    if (rank != 2) return;
    for (int64_t dilation : {1, 4}) {
      std::mt19937_64 rng(31500 + config.warps + config.head_dim + dilation);
      Problem p;
      p.rank = 2;
      p.dtype = DType::kFloat16;
      p.extent = {30, 29, 0};
      p.kernel = {7, 7, 0};
      p.dilation = {dilation, dilation, 1};
      p.heads = p.kv_heads = 2;
      p.dim = config.head_dim;
      p.has_rpb = true;
      if (!cuda::fused::halo_refusal(p, config).empty()) continue;  // 8x16 queries at head dim 64: 95 KB
      check_halo_forward(Case{p, 0}, rng);
    }
  });
  SKIP_IF_NO_CASE_RAN(before);
}

// Periodic axes: the key tiles at a seam reach past their group's ends and load each
// row's token on its own (tiles longer than a short group among them; it caught an
// off-by-one in 90879b7's row-delta seam path, since reverted). Per rank, head dims 32 (mma.sync), 64 and 128
// (warp-specialized wgmma on sm_90), every draw with a periodic axis, short and long
// ones (extents from 3 up), with dilation, stride, rpb, GQA and additional tokens.
TEST(FusedForwardPeriodic, SeamTilesMatchReference) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 3; ++seed) {
      std::mt19937_64 rng(31500 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 150 : rank == 2 ? 20 : 9;
      o.allow_periodic = true;
      Problem p = testing::random_problem(rng, o);
      while (!p.any_periodic()) p = testing::random_problem(rng, o);
      Case c{p, seed == 1 ? 8 : 0};
      c.p.dim = 32 << seed;
      c.p.dim_v = 0;
      check_forward(c, rng);
      if (HasFatalFailure()) return;
    }
  // The warp-specialized kernels, whose producer warpgroup loads the seam tiles
  // (forced: the planner gives these small problems to the 4-warp kernels), 64- and
  // 128-key tiles.
  if (cuda::fused::hopper_device())
    for (int rank = 1; rank <= 3; ++rank)
      for (const int block_kv : {64, 128}) {
        const int i = warp_specialized_entry(rank, 128, block_kv);
        if (i < 0) continue;  // 128-key tiles: not every rank has them
        setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
        std::mt19937_64 rng(31600 + 10 * rank + block_kv);
        testing::RandomOptions o;
        o.rank = rank;
        o.dtype = DType::kFloat16;
        o.max_extent = rank == 1 ? 300 : rank == 2 ? 24 : 10;
        o.allow_periodic = true;
        Problem p = testing::random_problem(rng, o);
        while (!p.any_periodic()) p = testing::random_problem(rng, o);
        Case c{p, 0};
        c.p.dim = 128;
        c.p.dim_v = 0;
        check_forward(c, rng);
        unsetenv("NBHD_FUSED_TILE");
        if (HasFatalFailure()) return;
      }
  SKIP_IF_NO_CASE_RAN(before);
}

// A query sub-box (the distributed path's interior and border calls): tiles over the
// box only, q, out and lse holding its tokens. Per rank, head dims 32 (mma.sync), 64
// and 128 (wgmma on sm_90), periodic axes among the draws; then the TMA producer,
// which a box turns back to cp.async.
TEST(FusedForwardQuerySubBox, MatchesReference) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  int boxed = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 6; ++seed) {
      std::mt19937_64 rng(31000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 120 : rank == 2 ? 16 : 7;
      o.allow_periodic = true;
      Case c{testing::with_random_box(testing::random_problem(rng, o), rng), seed == 1 ? 8 : 0};
      c.p.dim = 32 << (seed % 3);
      c.p.dim_v = 0;
      boxed += c.p.has_query_box();
      check_forward(c, rng);
      if (HasFatalFailure()) return;
    }
  EXPECT_GE(boxed, 12) << "the seeds drew too few sub-boxes";
  {
    // Groups of 4 tokens, which fused runs unfolded without a box (core/unfold.hpp;
    // the parts' views cover the grid): with one, the problem runs as it is.
    Case c{Problem{}, 0};
    c.p.rank = 2;
    c.p.extent = {60, 5, 1};
    c.p.kernel = {3, 3, 1};
    c.p.dilation = {15, 1, 1};
    c.p.batch = 2;
    c.p.heads = c.p.kv_heads = 2;
    c.p.dim = 64;
    c.p.dtype = DType::kFloat16;
    c.p.query_begin = {7, 1, 0};
    c.p.query_end = {50, 0, 0};
    std::mt19937_64 rng(31050);
    check_forward(c, rng);
  }
  if (cuda::fused::hopper_device()) {
    const int i = warp_specialized_entry(2, 64);
    ASSERT_GE(i, 0) << "no warp-specialized entry for rank 2";
    setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
    setenv("NBHD_FUSED_LOADS", "tma", 1);
    std::mt19937_64 rng(31100);
    testing::RandomOptions o;
    o.rank = 2;
    o.dtype = DType::kFloat16;
    o.max_extent = 20;
    Case c{testing::random_problem(rng, o), 0};
    c.p.extent[0] = std::max<int64_t>(c.p.extent[0], 8);
    c.p.query_begin = {3, 0, 0};
    c.p.query_end = {c.p.extent[0], 0, 0};
    c.p.dim = 64;
    c.p.dim_v = 0;
    c.p.additional_tokens = 0;
    check_forward(c, rng, -1, "cp.async: the query holds a sub-box");
    unsetenv("NBHD_FUSED_LOADS");
    unsetenv("NBHD_FUSED_TILE");
  }
  SKIP_IF_NO_CASE_RAN(before);
}

// Every entry of the tile table, forced through NBHD_FUSED_TILE, on random problems
// of its rank and head-dim bucket (the planner alone would leave some untested).
TEST(FusedForwardConfigs, EveryTableEntry) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  for (bool float32 : {false, true})
  for (int rank = 1; rank <= 3; ++rank)
    for (int64_t dim : {32, 64, 128}) {
      const DType kinds[] = {float32 ? DType::kFloat32 : DType::kFloat16, float32 ? DType::kFloat32 : DType::kBFloat16};
      const auto configs = cuda::fused::candidate_configs(kinds[0], rank, int(dim), cuda::fused::hopper_device());
      for (size_t i = 0; i < configs.size(); ++i) {
        SCOPED_TRACE(std::string(name(kinds[0])) + " rank " + std::to_string(rank) + " dim " + std::to_string(dim) +
                     " config " + std::to_string(i) + ": " + configs[i].why);
        setenv("NBHD_FUSED_TILE", std::to_string(i).c_str(), 1);
        for (int seed = 0; seed < 3; ++seed) {
          std::mt19937_64 rng(20000 + 1000 * rank + 10 * i + seed + (float32 ? 500 : 0));
          Case c = random_case(rng, rank, kinds[seed % 2]);
          c.p.dim = dim - 8 * (seed == 2);  // the bucket's edge and just inside it
          c.p.dim_v = 0;
          check_forward(c, rng);
        }
        unsetenv("NBHD_FUSED_TILE");
        if (HasFatalFailure()) return;
      }
    }
  SKIP_IF_NO_CASE_RAN(before);
}

// Every wgmma entry (one warpgroup, and the warp-specialized two with a producer),
// forced, on random problems of its rank at head dims 64, 128 and 256: the 2-D and 3-D
// ones skip key tiles a warpgroup's queries miss (the warp-specialized kernel then
// releases the stage without computing it).
TEST(FusedForwardWgmma, EveryEntryMatchesReference) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma forward needs an sm_90 device and a build with sm_90a";
  for_each_wgmma_entry(/*warps=*/0, [&](int rank, int bucket, int i) {
    for (int seed = 0; seed < 2; ++seed) {
      std::mt19937_64 rng(62000 + 1000 * rank + 10 * i + seed + bucket);
      Case c = random_case(rng, rank, seed ? DType::kBFloat16 : DType::kFloat16);
      c.p.dim = seed ? bucket : bucket / 2 + 8;  // the bucket's top, and just past the one below
      c.p.dim_v = seed ? bucket / 2 + 8 : 0;
      check_forward(c, rng);
    }
  });
  SKIP_IF_NO_CASE_RAN(before);
}

// The warp-specialized kernels' TMA producer (one thread copying boxes of the token
// grid) against their cp.async one, entry by entry, on random problems whose tensors
// TMA can address (dim = dim_v = the bucket, no additional tokens) with dilation,
// unequal groups, strides, causal axes, GQA, batches and padded rows: each matches
// the reference, and the two producers' results are equal bit for bit. Keys the
// cp.async producer zero-fills (past the key box) reach P as exact zeros either way,
// so a difference can only be a tile that landed wrong.
TEST(FusedForwardWgmma, TmaLoadsMatchCpAsyncBitwise) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma forward needs an sm_90 device and a build with sm_90a";
  for_each_wgmma_entry(/*warps=*/8, [&](int rank, int bucket, int i) {
    // One seed per entry, the dtypes alternating over entries and ranks (two per entry
    // took 287 s of the CI's emulator run, the longest test there).
    const int seed = (i + rank) % 2;
    std::mt19937_64 rng(64000 + 1000 * rank + 10 * i + seed + bucket);
    Case c = random_case(rng, rank, seed ? DType::kBFloat16 : DType::kFloat16);
    c.p.dim = bucket;
    c.p.dim_v = 0;
    c.p.additional_tokens = 0;
    c.p.periodic = {false, false, false};  // a wrapping key box is cp.async's
    if (c.gap && rank == 3) c.p.batch = 1;  // padded heads take a tensor-map dim: 5 with the axes and batch
    // TMA's traversal stride reaches dilation 8, and a box spans at most 256 tokens
    // (a key tile's extent times the dilation: 1-D tiles of 128 keys take dilation 2).
    const auto tile = cuda::fused::candidate_configs(DType::kFloat16, rank, bucket, /*hopper=*/true)[i].shape;
    for (int a = 0; a < rank; ++a)
      c.p.dilation[a] = std::min<int64_t>(c.p.dilation[a], std::min(8, 256 / tile.k(kMaxRank - rank + a)));
    std::mt19937_64 same = rng;
    std::vector<double> tma_out, tma_lse, copy_out, copy_lse;
    setenv("NBHD_FUSED_LOADS", "tma", 1);
    check_forward(c, rng, -1, "TMA", &tma_out, &tma_lse);
    unsetenv("NBHD_FUSED_LOADS");
    check_forward(c, same, -1, "cp.async", &copy_out, &copy_lse);
    if (::testing::Test::HasFailure()) return;
    for (size_t e = 0; e < tma_out.size(); ++e)
      ASSERT_EQ(std::memcmp(&tma_out[e], &copy_out[e], sizeof(double)), 0) << "out element " << e;
    for (size_t e = 0; e < tma_lse.size(); ++e)
      ASSERT_EQ(std::memcmp(&tma_lse[e], &copy_lse[e], sizeof(double)), 0) << "lse element " << e;
  });
  SKIP_IF_NO_CASE_RAN(before);
}

// The warp-specialized kernels' ping-pong schedule (NBHD_FUSED_SCHEDULE=pingpong:
// the consumer warpgroups take turns to issue their wgmmas; =free: they do not) on
// every such entry, 64- and 128-key tiles, on random problems with every feature
// (rpb, additional tokens, periodic axes, causal, GQA): it matches the reference,
// and the free-running schedule bit for bit, since only the order in which the
// warpgroups issue changes.
TEST(FusedForwardWgmma, PingPongMatchesFreeRunningBitwise) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma forward needs an sm_90 device and a build with sm_90a";
  for_each_wgmma_entry(/*warps=*/8, [&](int rank, int bucket, int i) {
    for (int seed = 0; seed < 2; ++seed) {
      std::mt19937_64 rng(66000 + 1000 * rank + 10 * i + seed + bucket);
      Case c = random_case(rng, rank, seed ? DType::kBFloat16 : DType::kFloat16);
      c.p.dim = seed ? bucket : bucket / 2 + 8;
      c.p.dim_v = 0;
      std::mt19937_64 same = rng;
      std::vector<double> turns_out, turns_lse, free_out, free_lse;
      setenv("NBHD_FUSED_SCHEDULE", "pingpong", 1);
      check_forward(c, rng, -1, nullptr, &turns_out, &turns_lse);
      setenv("NBHD_FUSED_SCHEDULE", "free", 1);
      check_forward(c, same, -1, nullptr, &free_out, &free_lse);
      unsetenv("NBHD_FUSED_SCHEDULE");
      if (::testing::Test::HasFailure()) return;
      ASSERT_EQ(turns_out.size(), free_out.size());
      for (size_t e = 0; e < turns_out.size(); ++e)
        ASSERT_EQ(std::memcmp(&turns_out[e], &free_out[e], sizeof(double)), 0) << "out element " << e;
      for (size_t e = 0; e < turns_lse.size(); ++e)
        ASSERT_EQ(std::memcmp(&turns_lse[e], &free_lse[e], sizeof(double)), 0) << "lse element " << e;
    }
  });
  SKIP_IF_NO_CASE_RAN(before);
}

// Shapes where tiles are full and interior (no element mask), and a large 2-D window.
TEST(FusedForwardShapes, AnchorLikeShapes) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  std::mt19937_64 rng(42);
  struct Shape {
    int rank;
    std::array<int64_t, 3> extent, kernel, dilation;
    bool causal;
    int64_t dim;
    DType dtype = DType::kFloat16;
  };
  const Shape shapes[] = {
      {2, {56, 56, 0}, {7, 7, 0}, {1, 1, 1}, false, 32},     // NAT
      {2, {56, 56, 0}, {7, 7, 0}, {4, 4, 1}, false, 32},     // DiNAT
      {2, {64, 64, 0}, {31, 31, 0}, {1, 1, 1}, false, 128},  // large window
      {1, {2048, 0, 0}, {512, 0, 0}, {1, 1, 1}, true, 64},   // 1-D causal
      {3, {8, 24, 40}, {4, 8, 12}, {1, 1, 1}, false, 128},   // video-like
      {2, {56, 56, 0}, {7, 7, 0}, {4, 4, 1}, false, 32, DType::kFloat32},  // DiNAT, float32 (StyleNAT runs float32)
      {2, {32, 32, 0}, {13, 13, 0}, {1, 1, 1}, false, 128, DType::kFloat32},  // 32-key tiles, whole interior ones
  };
  for (const Shape& s : shapes) {
    Case c;
    c.gap = 0;
    c.p.rank = s.rank;
    c.p.extent = s.extent;
    c.p.kernel = s.kernel;
    c.p.dilation = s.dilation;
    c.p.causal = {s.causal, false, false};
    c.p.heads = 2;
    c.p.kv_heads = 1;
    c.p.dim = s.dim;
    c.p.dtype = s.dtype;
    check_forward(c, rng);
  }
  SKIP_IF_NO_CASE_RAN(before);
}

// A kernel needing more shared memory per block than the device allows is refused by
// supports(), with the sizes, so that auto dispatch falls back to naive: head dim 256
// (16-bit) needs 164.5 KB, over sm_80's 163 KB. Runs where the device is that small
// (an A100; the CPU emulator with EMU_DEVICE=a100).
TEST(FusedForwardDevice, KernelsOverTheSharedMemoryLimitAreRefused) {
  NBHD_REQUIRE_GPU();
  int device = 0, limit = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), cudaSuccess);
  Problem p;
  p.rank = 1;
  p.extent = {300, 0, 0};
  p.kernel = {33, 0, 0};
  p.dim = 256;
  p.dtype = DType::kFloat16;
  const Status s = can_run(Backend::kFused, p, Device::kCUDA);
  if (s.message().find("in this build") != std::string::npos) GTEST_SKIP() << s.message();
  if (limit >= 168 * 1024) {
    EXPECT_TRUE(s.ok()) << s.message();
    GTEST_SKIP() << "this GPU allows " << limit << " bytes per block: every fused kernel fits";
  }
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("bytes of shared memory per block; this GPU allows " + std::to_string(limit)),
            std::string::npos)
      << s.message();
}

// A grid over CUDA's 2^31 - 1 blocks is refused by supports(), with the sizes, so
// that auto passes the problem on (to naive, whose kernels loop over any size)
// instead of failing at launch: 2^20 tokens in tiles of at most 128 queries, 256
// heads and a batch of 1024 need at least 2^31 blocks.
TEST(FusedForwardDevice, GridsOverTheLaunchLimitAreRefused) {
  NBHD_REQUIRE_GPU();
  Problem p;
  p.rank = 1;
  p.extent = {1 << 20, 0, 0};
  p.kernel = {7, 0, 0};
  p.batch = 1024;
  p.heads = p.kv_heads = 256;
  p.dim = 64;
  p.dtype = DType::kFloat16;
  ASSERT_TRUE(p.validate().ok()) << p.validate().message();
  int checked = 0;
  for (const Backend b : {Backend::kFused, Backend::kGemm}) {
    if (!built(b)) continue;
    for (const bool backward : {false, true}) {
      const Status s = can_run(b, p, Device::kCUDA, backward);
      if (s.message().find("in this build") != std::string::npos) continue;
      ++checked;
      EXPECT_EQ(s.code(), StatusCode::kUnsupported) << name(b) << (backward ? " backward: " : ": ") << s.message();
      EXPECT_NE(s.message().find("thread blocks; CUDA launches at most 2^31 - 1"), std::string::npos)
          << name(b) << (backward ? " backward: " : ": ") << s.message();
    }
  }
  if (built(Backend::kNaive)) {
    EXPECT_TRUE(can_run(Backend::kNaive, p, Device::kCUDA).ok());
    EXPECT_TRUE(can_run(Backend::kNaive, p, Device::kCUDA, /*backward=*/true).ok());
  }
  if (checked == 0) GTEST_SKIP() << "neither fused nor gemm runs float16 head dim 64 in this build";
}

// A GPU newer than every architecture of the build (an sm_90a-only build on an
// sm_120 card) has no kernel image: supports() refuses it with the reason, so `auto`
// passes the problem on instead of failing every launch. Only the CPU emulator can be
// that GPU (EMU_DEVICE=sm120, which scripts/test runs); elsewhere skipped.
TEST(FusedForwardDevice, AGpuWithoutAKernelImageIsRefused) {
  NBHD_REQUIRE_GPU();
#ifndef NBHD_CUDA_EMULATOR
  GTEST_SKIP() << "needs a GPU this build has no kernel image for: the CPU emulator's EMU_DEVICE=sm120";
#else
  if (emu::device_model().kernel_image) GTEST_SKIP() << "the emulated GPU has an image; run with EMU_DEVICE=sm120";
  Problem p;
  p.rank = 1;
  p.extent = {100, 0, 0};
  p.kernel = {7, 0, 0};
  p.dim = 64;
  p.dtype = DType::kFloat16;
  ASSERT_TRUE(p.validate().ok());
  for (const bool backward : {false, true}) {
    const Status s = can_run(Backend::kFused, p, Device::kCUDA, backward);
    EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.message();
    EXPECT_NE(s.message().find("backend fused has no kernel image for this GPU (compute capability 12.0)"),
              std::string::npos)
        << s.message();
  }
#endif
}

// Tensors on a GPU other than the current one: the backend runs there (the shared-
// memory opt-in, above 48 KB at head dim 128, is per device), leaves the caller's
// current device as it was, and matches the reference. Runs first on the current
// device, as a process using both GPUs would. Needs two GPUs (the CPU emulator has
// two); skipped, with the reason, on one.
TEST(FusedForwardDevice, RunsOnTheTensorsDevice) {
  NBHD_REQUIRE_GPU();
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  if (count < 2) GTEST_SKIP() << "needs two GPUs, this machine has " << count;
  std::mt19937_64 rng(46);
  Case c;
  c.gap = 0;
  c.p.rank = 1;
  c.p.extent = {300, 0, 0};
  c.p.kernel = {33, 0, 0};
  c.p.heads = 2;
  c.p.dim = 128;
  c.p.dtype = DType::kFloat16;
  const Status runnable = can_run(Backend::kFused, c.p, Device::kCUDA);
  if (!runnable.ok()) GTEST_SKIP() << runnable.message();
  check_forward(c, rng);                   // on the current device, 0
  check_forward(c, rng, /*device=*/1);     // tensors on device 1, device 0 current
}

// Dilation groups shorter than a warp's 16 queries (and under 32 tokens in all): the
// dispatcher runs them unfolded into a J x G grid (core/unfold.hpp), in two parts
// where the groups are unequal. DiNAT's 7x7 groups run as they are.
TEST(FusedForwardShapes, ShortDilationGroups) {
  NBHD_REQUIRE_GPU();
  const int before = cases_run;
  std::mt19937_64 rng(44);
  struct Shape {
    int rank;
    std::array<int64_t, 3> extent, kernel, dilation, stride;
    std::array<bool, 3> causal;
    int64_t additional;
    bool rpb;
    int64_t gap;
  };
  const Shape shapes[] = {
      {1, {2048, 0, 0}, {3, 0, 0}, {520, 1, 1}, {1, 1, 1}, {}, 0, false, 0},  // groups of 4 and 3
      {1, {300, 0, 0}, {5, 0, 0}, {20, 1, 1}, {2, 1, 1}, {true, false, false}, 3, true, 8},  // equal groups of 15
      {2, {6, 36, 0}, {3, 3, 0}, {1, 9, 1}, {1, 1, 1}, {}, 0, true, 0},                   // axis 1 unfolded
      {2, {37, 12, 0}, {3, 3, 0}, {10, 2, 1}, {1, 3, 1}, {true, false, false}, 0, false, 8},  // 4 and 3, rank 3
      {2, {56, 56, 0}, {7, 7, 0}, {8, 8, 1}, {1, 1, 1}, {}, 0, true, 0},  // DiNAT's 7x7 groups: as they are
  };
  for (const Shape& s : shapes) {
    Case c;
    c.gap = s.gap;
    c.p.rank = s.rank;
    c.p.extent = s.extent;
    c.p.kernel = s.kernel;
    c.p.dilation = s.dilation;
    c.p.stride = s.stride;
    c.p.causal = s.causal;
    c.p.additional_tokens = s.additional;
    c.p.has_rpb = s.rpb;
    c.p.heads = 4;
    c.p.kv_heads = 2;
    c.p.dim = 32;
    c.p.dtype = DType::kFloat16;
    check_forward(c, rng);
  }
  SKIP_IF_NO_CASE_RAN(before);
}

}  // namespace
}  // namespace nbhd

namespace nbhd {
namespace {

// Element offsets past 2^31 in each tensor the kernels index: q, k, v and out in turn
// are held with token rows kTokenStride elements apart, so the rows of tokens >= 256
// start beyond 2^31 elements (4.3 GB of float16); the other tensors stay packed.
// Both instruction paths run where the GPU has two (wgmma on sm_90 at head dim 64).
TEST(FusedForwardLarge, OffsetsPast2Pow31Elements) {
  NBHD_REQUIRE_GPU();
  constexpr int64_t L = 260, H = 2, D = 64, kTokenStride = (int64_t(1) << 23) + 8;
  const size_t big_bytes = size_t((L - 1) * kTokenStride + H * D) * 2;  // one strided tensor at a time
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  if (free_bytes < big_bytes + (size_t(1) << 30))
    GTEST_SKIP() << "needs " << (big_bytes >> 20) + 1024 << " MiB of free GPU memory, has " << (free_bytes >> 20);

  Problem p;
  p.rank = 1;
  p.extent = {L, 0, 0};
  p.kernel = {33, 0, 0};
  p.heads = H;
  p.kv_heads = 1;
  p.dim = D;
  p.dtype = DType::kFloat16;
  if (const Status s = can_run(Backend::kFused, p, Device::kCUDA); !s.ok()) {
    ASSERT_NE(s.message().find("in this build"), std::string::npos) << s.message();
    GTEST_SKIP() << s.message();
  }
  std::mt19937_64 rng(77);
  const Inputs in(p, rng);
  const testing::DenseResult exact = testing::dense_attention(p, in);
  HostTensor plain(p.dtype, {1, L, H, D});
  ASSERT_TRUE(cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), {}, {}, {}, plain.ref(), {}}, true).ok());

  const char* names[] = {"query", "key", "value", "out"};
  for (int strided = 0; strided < 4; ++strided)
    for (bool mma_sync_only : {false, true}) {
      SCOPED_TRACE(std::string(names[strided]) + " strided" + (mma_sync_only ? ", NBHD_FUSED_NO_WGMMA=1" : ""));
      HostTensor out(p.dtype, {1, L, H, D});
      DeviceTensor q(in.q), k(in.k), v(in.v), d_out(out);
      const HostTensor* sources[] = {&in.q, &in.k, &in.v, &out};
      const testing::StridedDeviceTensor big(*sources[strided], kTokenStride);
      if (HasFailure()) return;
      TensorRef refs[] = {q.ref(), k.ref(), v.ref(), d_out.ref()};
      refs[strided] = big.ref();
      Options o;
      o.backend = Backend::kFused;
      if (mma_sync_only) setenv("NBHD_FUSED_NO_WGMMA", "1", 1);
      const Status s = forward(p, {refs[0], refs[1], refs[2], {}, {}, {}, refs[3], {}}, o);
      unsetenv("NBHD_FUSED_NO_WGMMA");
      ASSERT_TRUE(s.ok()) << s.message();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      if (strided == 3) big.copy_to(out);
      else d_out.copy_to(out);
      testing::expect_close("out", p.dtype, out.values(), exact.out, plain.values());
    }
}

}  // namespace
}  // namespace nbhd
