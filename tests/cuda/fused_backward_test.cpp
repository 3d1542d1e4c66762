// SPDX-License-Identifier: Apache-2.0
// The fused backward against the CPU reference on seeded random problems: ranks 1-3,
// extents that are not multiples of any tile, dilation with unequal groups, stride,
// every causal combination, periodic axes, GQA, Dv != D, additional tokens (their gradients too),
// RPB and its gradient, padded strides, head dims 8..128 (4..124 in float32), element
// offsets past 2^31; float16, bfloat16 and float32; both modes, and the deterministic
// mode bitwise over two runs.
//
// Tolerance: the flash-attention rule (testing.hpp), err <= 2 * err(plain) + 2 * noise
// (+ 2 * the float32 accumulation noise: expect_gradient),
// where the plain implementation is the textbook backward in the same precision,
// written below: P from the stored lse in base 2 as the kernels form it (score *
// scale * log2 e + bias * log2 e - lse * log2 e, each step in float32: in float32 a
// natural-base P differs from the kernels' by a few ulps of the exponent, which a d
// rpb of one pair showed at 4x the plain error), delta from the stored (rounded) out,
// dP, dS and every product accumulated in float32, P and dS rounded to the dtype where they
// enter a matrix product (as they must for tensor cores), gradients rounded to the
// dtype once; in float32 every product of two elements is formed from three tf32
// ones, as the kernels' (cpu::tf32x3_product). The exact answer is the float64
// reference on the same (rounded) inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "cpu/reference.hpp"
#include "cuda/fused/backward_plan.hpp"
#include "cuda/fused/host.hpp"
#include "cuda_testing.hpp"

namespace nbhd {
namespace {

using testing::DeviceTensor;
using testing::HostTensor;
using testing::Inputs;

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }

struct Case {
  Problem p;
  int64_t gap;
  bool lse_gradient = false;  // the loss uses lse too: BackwardTensors::d_lse given
  bool rpb_gradient = true;   // with an rpb: d rpb asked for (a frozen bias: not)
  // dQ by the halo dq pass (NBHD_FUSED_BACKWARD_DQ=halo) in both modes, checked to run
  // it, instead of by atomics and by the tiled dq pass.
  bool halo_dq = false;
  // dK and dV by the halo key pass (NBHD_FUSED_BACKWARD_KEY=halo) in every run,
  // checked to run it.
  bool halo_key = false;
};

// Sets an environment variable for a scope (none when name is null).
struct ScopedEnv {
  const char* name;
  ScopedEnv(const char* n, const char* value) : name(n) {
    if (name) setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (name) unsetenv(name);
  }
};

// Largest extent per rank: the float64 oracle and the plain backward stay quick
// (NBHD_TEST_SMALL=1 shrinks them further for the CPU emulator).
int max_extent(int rank) {
  const bool small = std::getenv("NBHD_TEST_SMALL") != nullptr;
  return rank == 1 ? (small ? 160 : 300) : rank == 2 ? (small ? 18 : 28) : (small ? 7 : 10);
}

// Forces the first wgmma key-pass entry of (dtype, rank, head dim) on an sm_90 device
// through NBHD_FUSED_BACKWARD_TILE (the caller unsets it); false where there is none.
bool force_wgmma_key_pass(const Problem& p) {
  const auto configs = cuda::fused::backward_candidates(p.dtype, p.rank, int(p.dim), /*hopper=*/true);
  const auto entry = std::find_if(configs.begin(), configs.end(), [](const auto& t) { return t.wgmma; });
  if (entry == configs.end()) return false;
  setenv("NBHD_FUSED_BACKWARD_TILE", std::to_string(entry - configs.begin()).c_str(), 1);
  return true;
}

Case random_case(std::mt19937_64& rng, int rank, DType dtype) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  testing::RandomOptions o;
  o.rank = rank;
  o.dtype = dtype;
  o.max_extent = max_extent(rank);
  o.allow_periodic = true;  // query and key tiles past a periodic axis's seam load row by row
  Case c{testing::random_problem(rng, o), 0};
  // Head dims: multiples of 16 bytes up to 128 (the backward's largest bucket), often
  // at a bucket's edge or just past it.
  const int64_t dims16[] = {8, 24, 32, 40, 64, 72, 128};
  const int64_t dims32[] = {4, 12, 32, 36, 64, 68, 124};
  const int64_t* dims = dtype == DType::kFloat32 ? dims32 : dims16;
  c.p.dim = dims[uniform(0, 6)];
  c.p.dim_v = uniform(0, 2) == 0 ? dims[uniform(0, 6)] : 0;
  c.p.heads = c.p.kv_heads * uniform(1, 3);
  c.gap = uniform(0, 3) == 0 ? 16 / size_of(dtype) : 0;
  c.lse_gradient = uniform(0, 2) == 0;
  return c;
}

// Row-major logical index of element d of (b, token, h) in a [B, X..., heads, n] tensor.
int64_t row_index(const Problem& p, int64_t b, const int* token, int64_t h, int64_t heads, int64_t n, int64_t d) {
  int64_t flat = b;
  for (int a = 0; a < kMaxRank; ++a) flat = flat * p.padded_extent(a) + token[a];
  return (flat * heads + h) * n + d;
}

struct Gradients {
  std::vector<double> dq, dk, dv, drpb, dak, dav;
};

// The plain backward in the problem's precision (see the file comment). With
// `magnitudes`, each gradient element is instead the first-order sensitivity of its
// value to one relative rounding in every float32 step that leads to it (the sums
// of S, dP and delta, the exponent, P, dP - delta, dS, each product and the
// gradient's sum), in magnitudes: its float32 rounding noise is 2^-24 times that
// (expect_gradient). Exact, scaled as the gradient.
Gradients plain_backward(const Problem& p, const Inputs& in, const HostTensor& out, const HostTensor& lse,
                         const HostTensor& d_out, const HostTensor& d_lse, bool magnitudes = false) {
  const Neighborhood nb = p.neighborhood();
  const int64_t H = p.heads, Hkv = p.kv_heads, G = p.heads_per_kv(), D = p.dim, Dv = p.value_dim(),
                M = p.additional_tokens;
  const double scale = p.softmax_scale();
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = float(scale * 1.4426950408889634);  // the kernels' parameter
  auto f32 = [](double x) { return double(float(x)); };
  auto low = [&](double x) { return round_to(p.dtype, x); };
  const bool tf32x3 = p.dtype == DType::kFloat32;
  auto mul = [&](double x, double y) { return tf32x3 ? cpu::tf32x3_product(x, y) : x * y; };
  auto accumulate = [&](double& sum, double term) { sum = f32(sum + term); };
  Gradients g;
  g.dq.assign(size_t(p.batch) * p.query_tokens() * H * D, 0);
  g.dk.assign(size_t(p.batch) * p.tokens() * Hkv * D, 0);
  g.dv.assign(size_t(p.batch) * p.tokens() * Hkv * Dv, 0);
  g.drpb.assign(p.has_rpb ? size_t(H) * p.rpb_size() : 0, 0);
  g.dak.assign(size_t(p.batch) * M * Hkv * D, 0);
  g.dav.assign(size_t(p.batch) * M * Hkv * Dv, 0);
  auto rpb_index = [&](int64_t h, const int* idx) {
    int64_t i = h;
    for (int a = kMaxRank - p.rank; a < kMaxRank; ++a) i = i * (2 * nb.axis[a].kernel - 1) + idx[a];
    return i;
  };
  // The query side (q, out, lse, their gradients) holds the query sub-box's tokens.
  const Range r0 = p.padded_query_range(0), r1 = p.padded_query_range(1), r2 = p.padded_query_range(2);
  auto query_index = [&](int64_t b, const int* t, int64_t h, int64_t n, int64_t d) {
    const int64_t flat = ((b * r0.size() + t[0] - r0.begin) * r1.size() + t[1] - r1.begin) * r2.size() + t[2] - r2.begin;
    return (flat * H + h) * n + d;
  };
  for (int64_t b = 0; b < p.batch; ++b)
    for (int x0 = r0.begin; x0 < r0.end; ++x0)
      for (int x1 = r1.begin; x1 < r1.end; ++x1)
        for (int x2 = r2.begin; x2 < r2.end; ++x2)
          for (int64_t h = 0; h < H; ++h) {
            const int t[kMaxRank] = {x0, x1, x2};
            const int64_t hk = h / G;
            auto Q = [&](int64_t d) { return in.q.get(query_index(b, t, h, D, d)); };
            auto dO = [&](int64_t d) { return d_out.get(query_index(b, t, h, Dv, d)); };
            const float lse2_t = float(lse.get(query_index(b, t, h, 1, 0))) * kLog2e;
            double delta = 0, delta_mag = 0;
            for (int64_t d = 0; d < Dv; ++d) {
              const double term = dO(d) * out.get(query_index(b, t, h, Dv, d));
              delta = f32(delta + term);
              delta_mag += std::abs(term);
            }
            if (d_lse.ref().defined()) {  // dS = P (dP - delta + d lse)
              const double g = d_lse.get(query_index(b, t, h, 1, 0));
              delta = f32(delta - g);
              delta_mag += std::abs(g);
            }
            // One key (neighbor or additional): its rows' accessors and its gradient rows.
            auto visit = [&](auto&& K, auto&& V, double* dk_row, double* dv_row, double bias, double* drpb) {
              double s = 0, dp = 0, s_mag = 0, dp_mag = 0;
              for (int64_t d = 0; d < D; ++d) {
                s = f32(s + mul(Q(d), K(d)));
                s_mag += std::abs(Q(d) * K(d));
              }
              for (int64_t d = 0; d < Dv; ++d) {
                dp = f32(dp + mul(dO(d), V(d)));
                dp_mag += std::abs(dO(d) * V(d));
              }
              const float x = float(s) * scale_log2 + float(bias) * kLog2e;
              const double prob = std::exp2(x - lse2_t);
              const double ds = f32(prob * f32(dp - delta));
              const double ds_low = low(ds), prob_low = low(prob);
              if (magnitudes) {
                // P = 2^x moves by ln 2 * (its exponent's rounding), relative; dS by
                // P's and by dP - delta's (whose terms' scale is dp_mag + delta_mag).
                const double x_mag = scale_log2 * s_mag + std::abs(bias) * kLog2e + std::abs(lse2_t);
                const double p_mag = prob * (1 + 0.6931471805599453 * x_mag);
                const double ds_mag = p_mag * std::abs(dp - delta) + prob * (dp_mag + delta_mag + std::abs(dp - delta));
                for (int64_t d = 0; d < D; ++d) {
                  g.dq[query_index(b, t, h, D, d)] += ds_mag * std::abs(K(d)) + std::abs(ds * K(d));
                  dk_row[d] += ds_mag * std::abs(Q(d)) + std::abs(ds * Q(d));
                }
                for (int64_t d = 0; d < Dv; ++d) dv_row[d] += p_mag * std::abs(dO(d)) + std::abs(prob * dO(d));
                if (drpb) *drpb += ds_mag;
                return;
              }
              for (int64_t d = 0; d < D; ++d) {
                accumulate(g.dq[query_index(b, t, h, D, d)], mul(ds_low, K(d)));
                accumulate(dk_row[d], mul(ds_low, Q(d)));
              }
              for (int64_t d = 0; d < Dv; ++d) accumulate(dv_row[d], mul(prob_low, dO(d)));
              if (drpb) accumulate(*drpb, ds);
            };
            const Neighborhood::Windows w = nb.windows(t);
            for (int j0 = w.range[0].begin; j0 < w.range[0].end; ++j0)
              for (int j1 = w.range[1].begin; j1 < w.range[1].end; ++j1)
                for (int j2 = w.range[2].begin; j2 < w.range[2].end; ++j2) {
                  const int j[kMaxRank] = {j0, j1, j2};
                  int u[kMaxRank], idx[kMaxRank];
                  for (int a = 0; a < kMaxRank; ++a) {
                    const Axis& ax = nb.axis[a];
                    u[a] = w.group[a] + ax.dilation * ax.wrap(j[a], ax.group_length(w.group[a]));
                    idx[a] = Neighborhood::rpb_entry(ax, t[a], j[a]);  // the unwrapped entry
                  }
                  const double bias = p.has_rpb ? in.rpb.get(rpb_index(h, idx)) : 0.0;
                  visit([&](int64_t d) { return in.k.get(row_index(p, b, u, hk, Hkv, D, d)); },
                        [&](int64_t d) { return in.v.get(row_index(p, b, u, hk, Hkv, Dv, d)); },
                        &g.dk[row_index(p, b, u, hk, Hkv, D, 0)], &g.dv[row_index(p, b, u, hk, Hkv, Dv, 0)], bias,
                        p.has_rpb ? &g.drpb[rpb_index(h, idx)] : nullptr);
                }
            for (int64_t m = 0; m < M; ++m) {
              const size_t kr = size_t((b * M + m) * Hkv + hk);
              visit([&](int64_t d) { return in.ak.get(int64_t(kr) * D + d); },
                    [&](int64_t d) { return in.av.get(int64_t(kr) * Dv + d); }, &g.dak[kr * D], &g.dav[kr * Dv], 0.0,
                    nullptr);
            }
          }
  auto finish = [&](std::vector<double>& gradient, double factor) {
    for (double& x : gradient) x = magnitudes ? factor * x : low(f32(factor * x));
  };
  finish(g.dq, scale);
  finish(g.dk, scale);
  finish(g.dak, scale);
  finish(g.dv, 1);
  finish(g.dav, 1);
  return g;
}

// The flash-attention rule for a gradient, plus its float32 computation noise: one
// rounding in every float32 step, propagated to first order, 2^-24 * max(magnitude)
// (plain_backward with `magnitudes`). The kernels round other intermediates in
// another order than the plain loop (per tile, pass and warp, then atomics); in
// 16 bits the output's own rounding noise hides that, in float32 it does not, and
// where dP - delta cancels the two computations' errors differ by more than 2x: a d
// additional keys of 16 terms had 2.8e-6 against the plain 8.8e-7 on the CPU
// emulator, and the last-sum rounding alone (2^-24 * sum |terms|) did not cover it.
// A missing term or a tf32-rounded product costs 2^-11 of a term and more, far above.
void expect_gradient(const std::string& what, DType dtype, const std::vector<double>& got,
                     const std::vector<double>& exact, const std::vector<double>& plain,
                     const std::vector<double>& magnitude) {
  double largest = 0;
  for (double m : magnitude) largest = std::max(largest, m);
  testing::expect_close(what, dtype, got, exact, plain, std::ldexp(largest, -24));
}

// The fused backward's outputs on the host.
struct KernelRun {
  HostTensor dq, dk, dv, drpb, dak, dav;
};

std::vector<double> values(const HostTensor& t) { return t.ref().defined() ? t.values() : std::vector<double>{}; }

// Bytes of the logical elements (padding excluded), for bitwise comparison.
std::vector<unsigned char> bytes(const HostTensor& t) {
  std::vector<unsigned char> out;
  if (!t.ref().defined()) return out;
  const int size = size_of(t.ref().dtype);
  const auto* base = static_cast<const unsigned char*>(t.ref().data);
  for (int64_t i = 0; i < t.numel(); ++i) out.insert(out.end(), base + t.offset(i) * size, base + (t.offset(i) + 1) * size);
  return out;
}

// Returns whether the case ran (false: its kernels are not in this build).
// loads: where given, how the wgmma key pass must load Q and dO (key_pass_loads'
// first word, "TMA" or "cp.async"); deterministic_out: where given, receives the
// deterministic mode's gradients.
bool check_backward(const Case& c, std::mt19937_64& rng, const char* loads = nullptr,
                    KernelRun* deterministic_out = nullptr) {
  const Problem& p = c.p;
  SCOPED_TRACE(p.to_string() + (c.gap ? " (padded strides)" : "") + (c.lse_gradient ? " (with lse's gradient)" : ""));
  // The halo key pass where asked for, else the tiled (or wgmma) one, which the
  // default would replace on small windows (halo_by_default).
  const ScopedEnv key_pass("NBHD_FUSED_BACKWARD_KEY", c.halo_key ? "halo" : "tiled");
  const Inputs in(p, rng, c.gap);
  auto out_shape = shape_of(in.q.ref());
  out_shape.back() = p.value_dim();
  auto lse_shape = shape_of(in.q.ref());
  lse_shape.pop_back();
  HostTensor out(p.dtype, out_shape, c.gap), lse(DType::kFloat32, lse_shape), d_out(p.dtype, out_shape, c.gap);
  d_out.fill_random(rng);
  HostTensor d_lse = c.lse_gradient ? HostTensor(DType::kFloat32, lse_shape) : HostTensor();
  if (c.lse_gradient) d_lse.fill_random(rng);
  EXPECT_TRUE(cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), in.rpb.ref(), in.ak.ref(), in.av.ref(),
                                         out.ref(), lse.ref()},
                                     false)
                  .ok());

  // Exact gradients: the float64 reference on the same (rounded) inputs.
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
  HostTensor out64(DType::kFloat64, out_shape), lse64(DType::kFloat64, lse_shape), d_out64(DType::kFloat64, out_shape);
  HostTensor d_lse64 = c.lse_gradient ? HostTensor(DType::kFloat64, lse_shape) : HostTensor();
  copy(out, out64);
  copy(lse, lse64);
  copy(d_out, d_out64);
  if (c.lse_gradient) copy(d_lse, d_lse64);
  auto gradient_tensors = [&](DType dtype, int64_t gap) {
    KernelRun r;
    r.dq = HostTensor(dtype, shape_of(in.q.ref()), gap);
    r.dk = HostTensor(dtype, shape_of(in.k.ref()), gap);
    r.dv = HostTensor(dtype, shape_of(in.v.ref()), gap);
    if (p.has_rpb && c.rpb_gradient) r.drpb = HostTensor(DType::kFloat32, shape_of(in.rpb.ref()), gap);
    if (p.additional_tokens) {
      r.dak = HostTensor(dtype, shape_of(in.ak.ref()), gap);
      r.dav = HostTensor(dtype, shape_of(in.av.ref()), gap);
    }
    return r;
  };
  KernelRun exact = gradient_tensors(DType::kFloat64, 0);
  exact.drpb = p.has_rpb ? HostTensor(DType::kFloat64, shape_of(in.rpb.ref())) : HostTensor();
  EXPECT_TRUE(cpu::reference_backward(p64, {in64.q.ref(), in64.k.ref(), in64.v.ref(), in64.rpb.ref(), in64.ak.ref(),
                                            in64.av.ref(), out64.ref(), lse64.ref(), d_out64.ref(), exact.dq.ref(),
                                            exact.dk.ref(), exact.dv.ref(), exact.drpb.ref(), exact.dak.ref(),
                                            exact.dav.ref(), d_lse64.ref()})
                  .ok());
  const Gradients plain = plain_backward(p, in, out, lse, d_out, d_lse);
  const Gradients magnitude = plain_backward(p, in, out, lse, d_out, d_lse, /*magnitudes=*/true);

  DeviceTensor q(in.q), k(in.k), v(in.v), rpb(in.rpb), ak(in.ak), av(in.av), dev_out(out), dev_lse(lse), dev_dout(d_out),
      dev_d_lse(d_lse);
  auto run = [&](bool deterministic, KernelRun* result) {
    *result = gradient_tensors(p.dtype, c.gap);
    KernelRun& r = *result;
    // Poison: every element must be written.
    for (HostTensor* t : {&r.dq, &r.dk, &r.dv, &r.drpb, &r.dak, &r.dav})
      for (int64_t i = 0; i < (t->ref().defined() ? t->numel() : 0); ++i) t->set(i, std::nan(""));
    DeviceTensor dq(r.dq), dk(r.dk), dv(r.dv), drpb(r.drpb), dak(r.dak), dav(r.dav);
    Options o;
    o.backend = Backend::kFused;
    o.deterministic = deterministic;
    const BackwardTensors tensors{q.ref(),        k.ref(),        v.ref(),         rpb.ref(),
                                  ak.ref(),       av.ref(),       dev_out.ref(),   dev_lse.ref(),
                                  dev_dout.ref(), dq.ref(),       dk.ref(),        dv.ref(),
                                  drpb.ref(),     dak.ref(),      dav.ref(),      dev_d_lse.ref()};
    if (loads)
      EXPECT_EQ(cuda::fused::key_pass_loads(p, tensors).rfind(loads, 0), 0u) << cuda::fused::key_pass_loads(p, tensors);
    const Status s = backward(p, tensors, o);
    if (!s.ok()) return s;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    dq.copy_to(r.dq);
    dk.copy_to(r.dk);
    dv.copy_to(r.dv);
    drpb.copy_to(r.drpb);
    dak.copy_to(r.dak);
    dav.copy_to(r.dav);
    return s;
  };
  auto expect_accurate = [&](const KernelRun& r, const char* mode) {
    SCOPED_TRACE(mode);
    expect_gradient("dq", p.dtype, values(r.dq), values(exact.dq), plain.dq, magnitude.dq);
    expect_gradient("dk", p.dtype, values(r.dk), values(exact.dk), plain.dk, magnitude.dk);
    expect_gradient("dv", p.dtype, values(r.dv), values(exact.dv), plain.dv, magnitude.dv);
    if (c.rpb_gradient) expect_gradient("d rpb", p.dtype, values(r.drpb), values(exact.drpb), plain.drpb, magnitude.drpb);
    expect_gradient("d additional keys", p.dtype, values(r.dak), values(exact.dak), plain.dak, magnitude.dak);
    expect_gradient("d additional values", p.dtype, values(r.dav), values(exact.dav), plain.dav, magnitude.dav);
  };

  // The default mode takes dQ from float32 atomics or from the dq pass, by the
  // window size (backward_plan.hpp); run both (or the halo dq pass, asked for).
  const std::vector<const char*> dq_modes = c.halo_dq ? std::vector<const char*>{"halo"}
                                                      : std::vector<const char*>{"atomics", "pass"};
  for (const char* dq : dq_modes) {
    setenv("NBHD_FUSED_BACKWARD_DQ", dq, 1);
    KernelRun r;
    const Status s = run(/*deterministic=*/false, &r);
    if (s.ok() && c.halo_dq) EXPECT_TRUE(cuda::fused::backward_dq_halo(p)) << "the halo dq pass did not run";
    if (s.ok() && c.halo_key)
      EXPECT_TRUE(cuda::fused::backward_key_halo(p, p.has_rpb && c.rpb_gradient, /*deterministic=*/false))
          << "the halo key pass did not run";
    unsetenv("NBHD_FUSED_BACKWARD_DQ");
    if (!s.ok()) {
      // Only build filters may exclude a case; anything else is a bug in the test.
      EXPECT_NE(s.message().find("in this build"), std::string::npos) << s.message();
      return false;
    }
    expect_accurate(r, dq == std::string("atomics") ? "default mode, dQ by atomics"
                       : c.halo_dq                  ? "default mode, dQ by the halo dq pass"
                                                    : "default mode, dQ by the dq pass");
  }
  KernelRun first, second;
  setenv("NBHD_FUSED_BACKWARD_DQ", c.halo_dq ? "halo" : "pass", 1);  // the tiled dq pass unless asked
  EXPECT_TRUE(run(/*deterministic=*/true, &first).ok());
  EXPECT_TRUE(run(/*deterministic=*/true, &second).ok());
  unsetenv("NBHD_FUSED_BACKWARD_DQ");
  expect_accurate(first, "deterministic mode");
  for (auto [what, a, b] : {std::tuple{"dq", &first.dq, &second.dq}, {"dk", &first.dk, &second.dk},
                            {"dv", &first.dv, &second.dv}, {"d rpb", &first.drpb, &second.drpb},
                            {"d additional keys", &first.dak, &second.dak},
                            {"d additional values", &first.dav, &second.dav}})
    EXPECT_TRUE(bytes(*a) == bytes(*b)) << what << " differs between two deterministic runs";
  if (deterministic_out) *deterministic_out = std::move(first);
  return true;
}

// The halo dq pass (issue 20: small windows), asked for, on small-window problems
// (testing::small_window_problem: dilation with unequal groups, strides, causal and
// periodic axes, rpb, GQA, head dims 16-64), with lse's gradient in a third; both
// modes, the deterministic one bitwise twice.
TEST(FusedBackwardHalo, DqPassMatchesReference) {
  NBHD_REQUIRE_GPU();
  int ran = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int bucket : {32, 64})
      for (int seed = 0; seed < 3 && !HasFailure(); ++seed) {
        std::mt19937_64 rng(33000 + 100 * rank + bucket + seed);
        Case c{testing::small_window_problem(rng, rank, bucket), seed == 1 ? 8 : 0};
        c.lse_gradient = seed % 3 == 2;
        c.halo_dq = true;
        cuda::fused::TileConfig entry;
        if (!cuda::fused::halo_dq_entry(c.p, &entry)) continue;  // a key box over the shared memory
        ran += check_backward(c, rng);
      }
  if (ran == 0) GTEST_SKIP() << "no case's head dim is in this build (NBHD_HEAD_DIMS)";
}

// p with a random query sub-box that spans every periodic axis (the fused backward
// refuses the others: FusedBackwardQuerySubBox.APartialBoxOnAPeriodicAxisIsRefused).
Problem with_backward_box(Problem p, std::mt19937_64& rng) {
  p = testing::with_random_box(p, rng);
  for (int a = 0; a < p.rank; ++a)
    if (p.periodic[a]) p.query_begin[a] = p.query_end[a] = 0;
  return p;
}

// The halo key pass (NBHD_FUSED_BACKWARD_KEY=halo) on small-window problems, half of
// them with an rpb (its gradient binned in the default mode; deterministic d rpb runs
// on the tiled key pass; a frozen rpb in the first seed), GQA groups of 1-2 heads,
// lse's gradient in a third, query sub-boxes spanning the periodic axes in a third;
// dQ by the tiled dq pass or the halo one (both modes, the deterministic one bitwise
// twice).
TEST(FusedBackwardHalo, KeyPassMatchesReference) {
  NBHD_REQUIRE_GPU();
  int ran = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int bucket : {32, 64})
      for (int seed = 0; seed < 3 && !HasFailure(); ++seed) {
        std::mt19937_64 rng(34000 + 100 * rank + bucket + seed);
        Case c{testing::small_window_problem(rng, rank, bucket), seed == 1 ? 8 : 0};
        c.rpb_gradient = seed != 0;
        if (seed == 2) c.p = with_backward_box(c.p, rng);
        c.lse_gradient = seed % 3 == 2;
        c.halo_key = true;
        cuda::fused::TileConfig entry;
        if (!cuda::fused::halo_key_entry(c.p, c.p.has_rpb && c.rpb_gradient, /*deterministic=*/false, &entry))
          continue;  // a query box over the shared memory
        c.halo_dq = seed % 2 == 1 && cuda::fused::halo_dq_entry(c.p, &entry);
        ran += check_backward(c, rng);
      }
  if (ran == 0) GTEST_SKIP() << "no case's head dim is in this build (NBHD_HEAD_DIMS)";
}

class FusedBackward : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(FusedBackward, MatchesReference) {
  NBHD_REQUIRE_GPU();
  const auto [rank, dtype] = GetParam();
  const int seeds = std::getenv("NBHD_TEST_SMALL") ? 6 : 16;
  int ran = 0;
  for (int seed = 0; seed < seeds && !HasFailure(); ++seed) {
    std::mt19937_64 rng(7000 + 100 * rank + seed);
    Case c = random_case(rng, rank, dtype);
    if (seed % 4 == 3) c.p = with_backward_box(c.p, rng);  // a query sub-box, every dtype
    ran += check_backward(c, rng);
  }
  if (ran == 0) GTEST_SKIP() << "no case's head dim is in this build (NBHD_HEAD_DIMS)";
  std::printf("%d of %d cases ran (the others' head dims are not in this build)\n", ran, seeds);
}

INSTANTIATE_TEST_SUITE_P(All, FusedBackward,
                         ::testing::Combine(::testing::Values(1, 2, 3),
                                            ::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32)),
                         [](const auto& info) {
                           return "rank" + std::to_string(std::get<0>(info.param)) + "_" + name(std::get<1>(info.param));
                         });

// Small problems for compute-sanitizer (scripts/gpu-check runs *Smoke* under memcheck
// and racecheck): every rank, every dtype (float32 at head dims 32 and 128, its
// 64- and 32-column kernels), rpb and its gradient, additional tokens, GQA, padded
// strides, lse's gradient.
TEST(FusedBackwardSmoke, SmallProblems) {
  NBHD_REQUIRE_GPU();
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 5; ++seed) {
      std::mt19937_64 rng(31000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed >= 3 ? DType::kFloat32 : seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 90 : rank == 2 ? 12 : 6;
      Case c{testing::random_problem(rng, o), seed == 1 ? 8 : seed == 4 ? 4 : 0};
      c.p.dim = seed == 4 ? 128 : 32;
      c.p.dim_v = seed == 2 ? 16 : 0;
      c.p.has_rpb = seed != 1;
      c.p.additional_tokens = seed == 1 ? 3 : 0;
      c.p.heads = c.p.kv_heads * 2;
      c.lse_gradient = seed == 2 || seed == 3;
      check_backward(c, rng);
      if (HasFailure()) return;
    }
}

// A launch that fails in the middle of the backward's chain (d rpb zeroed,
// preprocess, key pass, dq, d rpb reduced) ends the call with its error and queues
// nothing after it: a later kernel would read what the failed one should have
// written. Only the CPU emulator can make a chosen launch fail (emu::failing_launch);
// elsewhere skipped.
TEST(FusedBackwardLaunches, AFailedLaunchStopsTheChain) {
  NBHD_REQUIRE_GPU();
#ifndef NBHD_CUDA_EMULATOR
  GTEST_SKIP() << "making one launch of a chain fail needs the CPU emulator (emu::failing_launch)";
#else
  std::mt19937_64 rng(34000);
  Problem p;
  p.rank = 2;
  p.extent = {9, 11, 0};
  p.kernel = {3, 5, 0};
  p.dim = 64;
  p.heads = p.kv_heads = 2;
  p.dtype = DType::kFloat16;
  p.has_rpb = true;
  ASSERT_TRUE(p.validate().ok());
  const Inputs in(p, rng, 0);
  auto out_shape = shape_of(in.q.ref());
  auto lse_shape = out_shape;
  lse_shape.pop_back();
  HostTensor out(p.dtype, out_shape), lse(DType::kFloat32, lse_shape), d_out(p.dtype, out_shape);
  d_out.fill_random(rng);
  ASSERT_TRUE(cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), in.rpb.ref(), in.ak.ref(), in.av.ref(),
                                         out.ref(), lse.ref()},
                                     false)
                  .ok());
  HostTensor dq(p.dtype, shape_of(in.q.ref())), dk(p.dtype, shape_of(in.k.ref())),
      dv(p.dtype, shape_of(in.v.ref())), drpb(DType::kFloat32, shape_of(in.rpb.ref()));
  DeviceTensor q(in.q), k(in.k), v(in.v), rpb(in.rpb), dev_out(out), dev_lse(lse), dev_dout(d_out), dev_dq(dq),
      dev_dk(dk), dev_dv(dv), dev_drpb(drpb);
  const BackwardTensors tensors{q.ref(),       k.ref(),       v.ref(),        rpb.ref(),      {},
                                {},            dev_out.ref(), dev_lse.ref(),  dev_dout.ref(), dev_dq.ref(),
                                dev_dk.ref(),  dev_dv.ref(),  dev_drpb.ref(), {},             {}};
  Options o;
  o.backend = Backend::kFused;
  for (const bool deterministic : {false, true}) {  // atomics and convert, or the dq pass
    SCOPED_TRACE(deterministic ? "deterministic" : "atomics");
    o.deterministic = deterministic;
    const long before = emu::launches;
    ASSERT_TRUE(backward(p, tensors, o).ok());
    const long chain = emu::launches - before;
    ASSERT_GE(chain, 4) << "d rpb, preprocess, key pass and dq are separate launches";
    for (long failing = 1; failing <= chain; ++failing) {
      SCOPED_TRACE("launch " + std::to_string(failing) + " of " + std::to_string(chain) + " fails");
      const long start = emu::launches;
      emu::failing_launch = start + failing;
      const Status s = backward(p, tensors, o);
      emu::failing_launch = 0;
      EXPECT_EQ(s.code(), StatusCode::kDeviceError) << s.message();
      EXPECT_EQ(emu::launches - start, failing) << "launches queued after the failed one";
    }
  }
#endif
}

// The wgmma key pass on small problems, forced (its first entry of each rank): every
// rank, GQA, additional tokens, Dv != D.
TEST(FusedBackwardSmoke, WgmmaKeyPass) {
  NBHD_REQUIRE_GPU();
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma key pass needs an sm_90 device and a build with sm_90a";
  int ran = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 2; ++seed) {
      std::mt19937_64 rng(32000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 200 : rank == 2 ? 14 : 6;
      o.allow_rpb = false;
      Case c{testing::random_problem(rng, o), 0};
      c.p.dim = seed ? 128 : 64;
      c.p.dim_v = seed ? 72 : 0;
      c.p.additional_tokens = seed ? 5 : 0;
      c.p.heads = c.p.kv_heads * 2;
      // Seed 0 loads Q and dO by TMA (NBHD_FUSED_LOADS=tma; dim = dim_v = the bucket; TMA's traversal
      // stride and box allow dilation 4 at 64-query 1-D tiles), seed 1 by cp.async.
      if (!seed)
        for (int a = 0; a < rank; ++a) c.p.dilation[a] = std::min<int64_t>(c.p.dilation[a], 4);
      ASSERT_TRUE(force_wgmma_key_pass(c.p));
      if (!seed) setenv("NBHD_FUSED_LOADS", "tma", 1);
      ran += check_backward(c, rng, seed ? "cp.async" : "TMA");
      unsetenv("NBHD_FUSED_LOADS");
      unsetenv("NBHD_FUSED_BACKWARD_TILE");
      if (HasFailure()) return;
    }
  if (ran == 0) GTEST_SKIP() << "no wgmma key pass in this build (NBHD_HEAD_DIMS / NBHD_DTYPES)";
}

// A query sub-box (the distributed path's pieces): the key pass walks only the box's
// queries (each key's inverse window clipped to it), the dq pass and the row passes
// its tiles and rows, q, out, d_out, lse and dq hold its tokens. Per rank, the
// planner's choice (rpb, GQA, additional tokens, lse's gradient among the draws;
// atomics, the dq pass and deterministic mode each run) and the wgmma key pass
// forced; periodic axes with the box spanning them.
TEST(FusedBackwardQuerySubBox, MatchesReference) {
  NBHD_REQUIRE_GPU();
  int ran = 0, boxed = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 4; ++seed) {
      std::mt19937_64 rng(33000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 100 : rank == 2 ? 14 : 6;
      o.allow_periodic = true;
      const bool wgmma = seed >= 2 && cuda::fused::hopper_device();
      o.allow_rpb = !wgmma;  // d rpb problems run the mma.sync key pass
      Case c{with_backward_box(testing::random_problem(rng, o), rng), seed == 1 ? 8 : 0};
      c.p.dim = 64 << (seed % 2);
      c.p.dim_v = 0;
      c.p.heads = c.p.kv_heads * (1 + seed % 2);
      c.lse_gradient = seed == 1;
      boxed += c.p.has_query_box();
      if (wgmma) ASSERT_TRUE(force_wgmma_key_pass(c.p));
      ran += check_backward(c, rng, wgmma ? "cp.async" : nullptr);
      unsetenv("NBHD_FUSED_BACKWARD_TILE");
      if (HasFailure()) return;
    }
  EXPECT_GE(boxed, 8) << "the seeds drew too few sub-boxes";
  if (ran == 0) GTEST_SKIP() << "no case's head dim is in this build (NBHD_HEAD_DIMS)";
}

// Periodic axes: the key pass's query tiles and the dq pass's key tiles at a seam
// reach past their group's ends and load each column's token on its own (tiles
// longer than a short group among them). Per rank, random periodic draws with the
// planner's kernels, then the wgmma key pass forced. (It caught an off-by-one and a
// missing shift in e61c788's seam path, since reverted.)
TEST(FusedBackwardPeriodic, SeamTilesMatchReference) {
  NBHD_REQUIRE_GPU();
  int ran = 0;
  for (int rank = 1; rank <= 3; ++rank)
    for (int seed = 0; seed < 3; ++seed) {
      std::mt19937_64 rng(34000 + 10 * rank + seed);
      testing::RandomOptions o;
      o.rank = rank;
      o.dtype = seed % 2 ? DType::kBFloat16 : DType::kFloat16;
      o.max_extent = rank == 1 ? 150 : rank == 2 ? 20 : 8;
      o.allow_periodic = true;
      const bool wgmma = seed == 2 && cuda::fused::hopper_device();
      o.allow_rpb = !wgmma;  // d rpb problems run the mma.sync key pass
      Problem p = testing::random_problem(rng, o);
      while (!p.any_periodic()) p = testing::random_problem(rng, o);
      Case c{p, seed == 1 ? 8 : 0};
      c.p.dim = 64 << (seed % 2);
      c.p.dim_v = 0;
      c.p.heads = c.p.kv_heads * (1 + seed % 2);
      if (wgmma) ASSERT_TRUE(force_wgmma_key_pass(c.p));
      ran += check_backward(c, rng, wgmma ? "cp.async" : nullptr);
      unsetenv("NBHD_FUSED_BACKWARD_TILE");
      if (HasFailure()) return;
    }
  if (ran == 0) GTEST_SKIP() << "no case's head dim is in this build (NBHD_HEAD_DIMS)";
}

// A sub-box that does not span a periodic axis is refused by the fused backward (its
// key pass keeps a periodic axis's inverse windows unwrapped), which names the axis;
// the forward runs it.
TEST(FusedBackwardQuerySubBox, APartialBoxOnAPeriodicAxisIsRefused) {
  NBHD_REQUIRE_GPU();
  Problem p;
  p.rank = 2;
  p.extent = {12, 20, 1};
  p.kernel = {3, 5, 1};
  p.periodic = {false, true, false};
  p.dim = 64;
  p.dtype = DType::kFloat16;
  p.query_begin = {2, 4, 0};
  p.query_end = {10, 16, 0};
  const Status s = can_run(Backend::kFused, p, Device::kCUDA, /*backward=*/true);
  if (!s.ok() && s.message().find("in this build") != std::string::npos) GTEST_SKIP() << s.message();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("query sub-box [4, 16) on periodic axis 1 of length 20"), std::string::npos)
      << s.message();
  EXPECT_TRUE(can_run(Backend::kFused, p, Device::kCUDA).ok());
  p.query_begin[1] = 0;
  p.query_end[1] = 0;
  EXPECT_TRUE(can_run(Backend::kFused, p, Device::kCUDA, /*backward=*/true).ok());
}

// Every backward tile entry, forced through NBHD_FUSED_BACKWARD_TILE (both passes), on
// random problems of its rank and head-dim bucket (the planner alone leaves some out).
TEST(FusedBackwardConfigs, EveryTableEntry) {
  NBHD_REQUIRE_GPU();
  for (bool float32 : {false, true})
  for (int rank = 1; rank <= 3; ++rank)
    for (int64_t dim : {32, 64, 128}) {
      const DType kinds[] = {float32 ? DType::kFloat32 : DType::kFloat16, float32 ? DType::kFloat32 : DType::kBFloat16};
      const auto configs = cuda::fused::backward_candidates(kinds[0], rank, int(dim), cuda::fused::hopper_device());
      for (size_t i = 0; i < configs.size(); ++i) {
        SCOPED_TRACE(std::string(name(kinds[0])) + " rank " + std::to_string(rank) + " dim " + std::to_string(dim) +
                     " config " + std::to_string(i) + ": " + configs[i].why);
        setenv("NBHD_FUSED_BACKWARD_TILE", std::to_string(i).c_str(), 1);
        for (int seed = 0; seed < 2; ++seed) {
          std::mt19937_64 rng(21000 + 1000 * rank + 10 * i + seed + (float32 ? 500 : 0));
          Case c = random_case(rng, rank, kinds[seed % 2]);
          c.p.dim = dim - 8 * seed;  // the bucket's edge and just inside it
          c.p.dim_v = 0;
          check_backward(c, rng);
        }
        unsetenv("NBHD_FUSED_BACKWARD_TILE");
        if (HasFailure()) return;
      }
    }
}

// Calls f(rank, bucket, entry) for every wgmma entry of the backward's table, ranks
// 1-3 and head dims 64 and 128, the entry forced through NBHD_FUSED_BACKWARD_TILE
// while f runs; stops at the first failure.
template <class F>
void for_each_wgmma_entry(F&& f) {
  for (int rank = 1; rank <= 3; ++rank)
    for (int bucket : {64, 128}) {
      const auto configs = cuda::fused::backward_candidates(DType::kFloat16, rank, bucket, /*hopper=*/true);
      for (size_t i = 0; i < configs.size(); ++i) {
        if (!configs[i].wgmma) continue;
        SCOPED_TRACE("rank " + std::to_string(rank) + " head dim " + std::to_string(bucket) + " config " +
                     std::to_string(i) + ": " + configs[i].why);
        setenv("NBHD_FUSED_BACKWARD_TILE", std::to_string(i).c_str(), 1);
        f(rank, bucket, int(i));
        unsetenv("NBHD_FUSED_BACKWARD_TILE");
        if (::testing::Test::HasFailure()) return;
      }
    }
}

// The wgmma key pass (sm_90a), forced through NBHD_FUSED_BACKWARD_TILE on each of its
// entries: random problems of every rank, float16 and bfloat16, head dims at its
// buckets' edges, Dv != D, GQA, additional tokens (their CTAs run the mma.sync key
// pass beside it), dilation, stride, causal, with an rpb and its gradient (binned in
// the kernel, head dim 64 only) on the first seed; both dQ strategies and the
// deterministic mode (check_backward; with d rpb it takes the mma.sync key pass).
TEST(FusedBackwardWgmma, EveryEntryMatchesReference) {
  NBHD_REQUIRE_GPU();
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma key pass needs an sm_90 device and a build with sm_90a";
  int ran = 0;
  for_each_wgmma_entry([&](int rank, int bucket, int i) {
    for (int seed = 0; seed < 2; ++seed) {
      std::mt19937_64 rng(52000 + 1000 * rank + 10 * i + seed + bucket);
      Case c = random_case(rng, rank, seed ? DType::kBFloat16 : DType::kFloat16);
      c.p.has_rpb = seed == 0 && bucket == 64;
      c.p.dim = seed ? bucket : bucket / 2 + 8;  // the bucket's top, and just past the one below
      c.p.dim_v = seed ? bucket / 2 + 8 : 0;
      ran += check_backward(c, rng);
    }
  });
  if (ran == 0) GTEST_SKIP() << "no wgmma key pass in this build (NBHD_HEAD_DIMS / NBHD_DTYPES)";
}

// The wgmma key pass's TMA producer of Q and dO against its cp.async one, entry by
// entry, on random problems whose tensors TMA can address (dim = dim_v = the bucket)
// with dilation, strides, causal axes, GQA, batches, padded rows and additional
// tokens (on the mma.sync kernel beside it): each matches the reference, and the
// deterministic gradients of the two producers are equal bit for bit. Query rows
// cp.async zero-fills (past the walk) reach P and dS as exact zeros either way. One
// seed per entry, dtypes alternating: each case runs the whole backward check twice
// (two seeds took 140-150 s on an H100 and an H200, host-bound).
TEST(FusedBackwardWgmma, TmaLoadsMatchCpAsyncBitwise) {
  NBHD_REQUIRE_GPU();
  if (!cuda::fused::hopper_device()) GTEST_SKIP() << "the wgmma key pass needs an sm_90 device and a build with sm_90a";
  int ran = 0;
  for_each_wgmma_entry([&](int rank, int bucket, int i) {
    const int seed = i % 2;
    std::mt19937_64 rng(56000 + 1000 * rank + 10 * i + seed + bucket);
    Case c = random_case(rng, rank, seed ? DType::kBFloat16 : DType::kFloat16);
    c.p.has_rpb = false;
    c.p.dim = bucket;
    c.p.dim_v = 0;
    c.p.periodic = {false, false, false};  // a wrapping query tile is cp.async's
    if (c.gap && rank == 3) c.p.batch = 1;  // padded heads take a tensor-map dim: 5 with the axes and batch
    for (int a = 0; a < rank; ++a) c.p.dilation[a] = std::min<int64_t>(c.p.dilation[a], 4);
    std::mt19937_64 same = rng;
    KernelRun tma, copies;
    setenv("NBHD_FUSED_LOADS", "tma", 1);
    ran += check_backward(c, rng, "TMA", &tma);
    unsetenv("NBHD_FUSED_LOADS");
    check_backward(c, same, "cp.async", &copies);
    if (::testing::Test::HasFailure()) return;
    for (auto [what, a, b] : {std::tuple{"dq", &tma.dq, &copies.dq}, {"dk", &tma.dk, &copies.dk},
                              {"dv", &tma.dv, &copies.dv}, {"d additional keys", &tma.dak, &copies.dak},
                              {"d additional values", &tma.dav, &copies.dav}})
      EXPECT_TRUE(bytes(*a) == bytes(*b)) << what << " differs between the TMA and the cp.async producer";
  });
  if (ran == 0) GTEST_SKIP() << "no wgmma key pass in this build (NBHD_HEAD_DIMS / NBHD_DTYPES)";
}

Case named_case(int rank, std::array<int64_t, 3> extent, std::array<int64_t, 3> kernel, int64_t dim) {
  Case c;
  c.gap = 0;
  c.p.rank = rank;
  c.p.extent = extent;
  c.p.kernel = kernel;
  c.p.heads = 2;
  c.p.kv_heads = 1;
  c.p.dim = dim;
  c.p.dtype = DType::kFloat16;
  return c;
}

// Full interior tiles (no element mask), GQA with several query heads per kv head,
// additional tokens past one 64-token CTA, RPB with its gradient, dilation and causal.
TEST(FusedBackwardShapes, Features) {
  NBHD_REQUIRE_GPU();
  std::mt19937_64 rng(43);
  std::vector<Case> cases;
  cases.push_back(named_case(2, {40, 40, 0}, {7, 7, 0}, 32));  // NAT-like
  cases.push_back(named_case(2, {24, 40, 0}, {13, 21, 0}, 128));
  cases.push_back(named_case(1, {700, 0, 0}, {255, 0, 0}, 64));
  cases.back().p.causal = {true, false, false};
  cases.push_back(named_case(3, {6, 12, 20}, {3, 5, 9}, 64));
  cases.push_back(named_case(2, {16, 16, 0}, {16, 16, 0}, 128));  // self attention: one key tile's queries reach all
  {
    Case c = named_case(2, {20, 28, 0}, {5, 7, 0}, 64);  // GQA 4:1, additional tokens, rpb
    c.p.heads = 8;
    c.p.kv_heads = 2;
    c.p.additional_tokens = 70;
    c.p.has_rpb = true;
    cases.push_back(c);
  }
  {
    Case c = named_case(2, {30, 30, 0}, {5, 3, 0}, 40);  // dilation, stride, causal, Dv != D, rpb
    c.p.dilation = {3, 4, 1};
    c.p.stride = {2, 3, 1};
    c.p.causal = {false, true, false};
    c.p.dim_v = 24;
    c.p.has_rpb = true;
    c.p.dtype = DType::kBFloat16;
    cases.push_back(c);
  }
  {
    Case c = named_case(2, {20, 28, 0}, {5, 7, 0}, 124);  // float32, 32-column tiles: GQA, additional, rpb
    c.p.heads = 4;
    c.p.kv_heads = 2;
    c.p.additional_tokens = 40;
    c.p.has_rpb = true;
    c.p.dtype = DType::kFloat32;
    cases.push_back(c);
  }
  for (const Case& c : cases) {
    check_backward(c, rng);
    if (HasFailure()) return;
  }
}

// One geometry in each dtype, in one process: plans are cached per geometry, and
// float32 at head dim 128 has other tile columns (32) than 16-bit (64). With a cache
// key that left out the dtype, the 16-bit kernels ran float32's plan after it and
// every gradient came out twice as large (seen through Python on an H100).
TEST(FusedBackwardShapes, OneGeometryInEachDtype) {
  NBHD_REQUIRE_GPU();
  std::mt19937_64 rng(47);
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    Case c = named_case(2, {12, 10, 0}, {12, 10, 0}, 128);
    c.p.dtype = dtype;
    check_backward(c, rng);
    if (HasFailure()) return;
  }
}

// Small dilation groups (core/unfold.hpp's kShortGroup, kSmallGroup) run unfolded: in
// two parts where groups are unequal and no gradient sums over every query, else
// in one part (equal groups) or as they are (rpb, additional tokens).
TEST(FusedBackwardShapes, ShortDilationGroups) {
  NBHD_REQUIRE_GPU();
  std::mt19937_64 rng(45);
  std::vector<Case> cases;
  cases.push_back(named_case(1, {2048, 0, 0}, {3, 0, 0}, 32));  // groups of 4 and 3: two parts
  cases.back().p.dilation = {520, 1, 1};
  cases.push_back(named_case(1, {300, 0, 0}, {5, 0, 0}, 64));  // equal groups of 15, rpb, additional
  cases.back().p.dilation = {20, 1, 1};
  cases.back().p.stride = {2, 1, 1};
  cases.back().p.causal = {true, false, false};
  cases.back().p.has_rpb = true;
  cases.back().p.additional_tokens = 3;
  cases.push_back(named_case(2, {37, 12, 0}, {3, 3, 0}, 32));  // unequal groups on axis 0, rank 3 parts
  cases.back().p.dilation = {10, 2, 1};
  cases.back().p.stride = {1, 3, 1};
  cases.back().p.heads = 4;
  cases.back().p.kv_heads = 2;
  cases.push_back(named_case(1, {500, 0, 0}, {7, 0, 0}, 32));  // unequal groups with rpb: run as it is
  cases.back().p.dilation = {43, 1, 1};
  cases.back().p.has_rpb = true;
  for (const Case& c : cases) {
    check_backward(c, rng);
    if (HasFailure()) return;
  }
}

// Element offsets past 2^31 in each tensor the backward indexes: q, k, v, out, d out,
// dq, dk and dv in turn are held with token rows 2^23 + 8 elements apart (rows of
// tokens >= 256 start beyond 2^31 elements, 4.3 GB of float16), the rest packed.
TEST(FusedBackwardLarge, OffsetsPast2Pow31Elements) {
  NBHD_REQUIRE_GPU();
  constexpr int64_t L = 260, kTokenStride = (int64_t(1) << 23) + 8;
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  const size_t big_bytes = size_t((L - 1) * kTokenStride + 128) * 2;  // one strided tensor at a time
  if (free_bytes < big_bytes + (size_t(1) << 30))
    GTEST_SKIP() << "needs " << (big_bytes >> 20) + 1024 << " MiB of free GPU memory, has " << (free_bytes >> 20);
  const Problem p = named_case(1, {L, 0, 0}, {33, 0, 0}, 64).p;  // 2 query heads on 1 kv head
  if (const Status s = can_run(Backend::kFused, p, Device::kCUDA); !s.ok()) {
    ASSERT_NE(s.message().find("in this build"), std::string::npos) << s.message();
    GTEST_SKIP() << s.message();
  }
  std::mt19937_64 rng(78);
  const Inputs in(p, rng);
  HostTensor out(p.dtype, shape_of(in.q.ref())), lse(DType::kFloat32, {1, L, p.heads}), d_out(p.dtype, shape_of(in.q.ref()));
  d_out.fill_random(rng);
  ASSERT_TRUE(cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), {}, {}, {}, out.ref(), lse.ref()}, false).ok());
  // Exact gradients: the float64 reference on the same (rounded) inputs and outputs.
  Problem p64 = p;
  p64.dtype = DType::kFloat64;
  Inputs in64(p64, rng);
  HostTensor out64(DType::kFloat64, shape_of(out.ref())), lse64(DType::kFloat64, shape_of(lse.ref())),
      d_out64(DType::kFloat64, shape_of(out.ref())), dq64(DType::kFloat64, shape_of(in.q.ref())),
      dk64(DType::kFloat64, shape_of(in.k.ref())), dv64(DType::kFloat64, shape_of(in.v.ref()));
  for (auto [from, to] : {std::pair{&in.q, &in64.q}, {&in.k, &in64.k}, {&in.v, &in64.v}, {&out, &out64},
                          {&lse, &lse64}, {&d_out, &d_out64}})
    for (int64_t i = 0; i < from->numel(); ++i) to->set(i, from->get(i));
  ASSERT_TRUE(cpu::reference_backward(p64, {in64.q.ref(), in64.k.ref(), in64.v.ref(), {}, {}, {}, out64.ref(),
                                            lse64.ref(), d_out64.ref(), dq64.ref(), dk64.ref(), dv64.ref(), {}, {}, {}})
                  .ok());
  const Gradients plain = plain_backward(p, in, out, lse, d_out, HostTensor());
  const Gradients magnitude = plain_backward(p, in, out, lse, d_out, HostTensor(), /*magnitudes=*/true);

  const char* names[] = {"query", "key", "value", "out", "d out", "d query", "d key", "d value"};
  for (int strided = 0; strided < 8; ++strided) {
    SCOPED_TRACE(std::string(names[strided]) + " strided");
    HostTensor dq(p.dtype, shape_of(in.q.ref())), dk(p.dtype, shape_of(in.k.ref())), dv(p.dtype, shape_of(in.v.ref()));
    DeviceTensor q(in.q), k(in.k), v(in.v), o(out), l(lse), g_out(d_out), g_q(dq), g_k(dk), g_v(dv);
    const HostTensor* sources[] = {&in.q, &in.k, &in.v, &out, &d_out, &dq, &dk, &dv};
    const testing::StridedDeviceTensor big(*sources[strided], kTokenStride);
    if (HasFailure()) return;
    TensorRef refs[] = {q.ref(), k.ref(), v.ref(), o.ref(), g_out.ref(), g_q.ref(), g_k.ref(), g_v.ref()};
    refs[strided] = big.ref();
    const Status s = backward(p, {refs[0], refs[1], refs[2], {}, {}, {}, refs[3], l.ref(), refs[4], refs[5], refs[6],
                                  refs[7], {}, {}, {}},
                              Options{Backend::kFused});
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    HostTensor* grads[] = {&dq, &dk, &dv};
    const DeviceTensor* packed[] = {&g_q, &g_k, &g_v};
    for (int i = 0; i < 3; ++i) {
      if (strided == 5 + i) big.copy_to(*grads[i]);
      else packed[i]->copy_to(*grads[i]);
    }
    expect_gradient("dq", p.dtype, dq.values(), dq64.values(), plain.dq, magnitude.dq);
    expect_gradient("dk", p.dtype, dk.values(), dk64.values(), plain.dk, magnitude.dk);
    expect_gradient("dv", p.dtype, dv.values(), dv64.values(), plain.dv, magnitude.dv);
  }
}

// Head dims past 128 are refused, with the reason (naive runs them).
TEST(FusedBackwardShapes, HeadDim256IsRefused) {
  NBHD_REQUIRE_GPU();
  std::mt19937_64 rng(44);
  const Problem p = named_case(1, {64, 0, 0}, {8, 0, 0}, 256).p;
  const Inputs in(p, rng);
  HostTensor out(p.dtype, shape_of(in.q.ref())), lse(DType::kFloat32, {1, 64, 2});
  HostTensor dq(p.dtype, shape_of(in.q.ref())), dk(p.dtype, shape_of(in.k.ref())), dv(p.dtype, shape_of(in.v.ref()));
  DeviceTensor q(in.q), k(in.k), v(in.v), o(out), l(lse), d_out(out), g_q(dq), g_k(dk), g_v(dv);
  const Status s = backward(p, {q.ref(), k.ref(), v.ref(), {}, {}, {}, o.ref(), l.ref(), d_out.ref(), g_q.ref(),
                                g_k.ref(), g_v.ref(), {}, {}, {}},
                            Options{Backend::kFused});
  ASSERT_FALSE(s.ok());
  if (s.message().find("in this build") != std::string::npos) GTEST_SKIP() << s.message();
  EXPECT_NE(s.message().find("<= 128"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace nbhd
