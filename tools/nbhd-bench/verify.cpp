// SPDX-License-Identifier: Apache-2.0
#include "verify.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <new>
#include <map>
#include <numeric>
#include <random>

#include "cpu/reference.hpp"

namespace nbhd::bench {
namespace {

// Reference work allowed for one --verify, in multiply-adds. The reference backend
// runs plain single-threaded loops at about 0.2 G multiply-adds/s (measured on a
// 2-core CI machine: 56x56 k13, d64, 8 slices, 1.1e9 in 5.6 s), so this keeps
// a verification under about 10 seconds.
constexpr double kBudgetMultiplyAdds = 1.5e9;
// Beyond this many slices the sample says enough about the whole problem.
constexpr int64_t kMaxSlices = 16;

// Backward bounds, relative to max|exact| of each gradient. The reference has no
// plain low-precision backward to calibrate the flash-attention rule against, so
// these follow NATTEN's per-dtype test tolerances (fp32 1e-4, bf16 5e-2), with fp16
// loosened to 2e-2: a gradient sums up to window-size products and is then stored in
// the dtype (fp16 rounding alone is 4.9e-4 relative, bf16 3.9e-3). float64 gets
// tests/cpp/cpu_backends_test's 1e-5: a backend's backward reads the forward's lse,
// which is stored in float32 (~6e-8 relative), and the exact reference recomputes it.
double backward_relative_bound(DType t) {
  switch (t) {
    case DType::kFloat64: return 1e-5;
    case DType::kFloat32: return 1e-4;
    case DType::kFloat16: return 2e-2;
    case DType::kBFloat16: return 5e-2;
  }
  return 0;
}

// float64 has no plain low-precision baseline (it would equal the exact result) and
// no rounding noise, so its forward bound (out, and lse, which is float64 for float64
// inputs) is the fixed one of the C++ tests.
constexpr double kFloat64Bound = 1e-10;

int64_t group_size(const Problem& p) { return p.heads / p.kv_heads; }

// Multiply-adds the reference spends on one slice: exact + plain forward, and for a
// backward pass the exact backward (about twice a forward).
double slice_cost(const Problem& p, Pass pass) {
  const double pairs = double(p.attended_pairs()) + double(p.query_tokens()) * double(p.additional_tokens);
  const double forward = pairs * double(group_size(p)) * double(p.dim + p.value_dim());
  return pass == Pass::kForward ? 2 * forward : 4 * forward;
}

// t restricted to [start, start + len) along dimension `dim` (a view, no copy).
TensorRef slice(TensorRef t, int dim, int64_t start, int64_t len) {
  if (!t.defined()) return t;
  t.data = static_cast<char*>(t.data) + start * t.stride[dim] * size_of(t.dtype);
  t.shape[dim] = len;
  return t;
}

// A contiguous host copy of a view's values, in `dtype`.
Tensor converted(const TensorRef& view, DType dtype) {
  Tensor t;
  if (!view.defined()) return t;
  Status s = Tensor::allocate(Device::kCPU, dtype, std::vector<int64_t>(view.shape, view.shape + view.ndim), &t);
  if (!s.ok()) throw std::bad_alloc();
  for (int64_t i = 0; i < view.numel(); ++i) set_value_at(t.ref, i, value_at(view, i));
  return t;
}

Tensor empty(DType dtype, const TensorRef& like) {
  Tensor t;
  if (!like.defined()) return t;
  Status s = Tensor::allocate(Device::kCPU, dtype, std::vector<int64_t>(like.shape, like.shape + like.ndim), &t);
  if (!s.ok()) throw std::bad_alloc();
  return t;
}

// Running maxima of one tensor's comparison over all checked slices.
struct Tally {
  double err = 0, plain_err = 0, noise = 0, max_ref = 0;
  bool finite = true;
  bool seen = false;

  void add(const TensorRef& got, const TensorRef& exact, const TensorRef* plain, DType noise_dtype) {
    seen = true;
    const std::vector<double> g = values(got), e = values(exact);
    std::vector<double> pl;
    if (plain) pl = values(*plain);
    for (size_t i = 0; i < g.size(); ++i) {
      if (!std::isfinite(g[i])) finite = false;
      err = std::max(err, std::abs(g[i] - e[i]));
      if (plain) plain_err = std::max(plain_err, std::abs(pl[i] - e[i]));
      noise = std::max(noise, std::abs(round_to(noise_dtype, e[i] + 0.3) - (e[i] + 0.3)));
      max_ref = std::max(max_ref, std::abs(e[i]));
    }
  }
};

// The tensors of one (batch b, kv head hk) slice of a workload, as views.
struct SliceViews {
  Problem problem;  // batch 1, heads = group, kv_heads 1
  ForwardTensors fwd;
  BackwardTensors bwd;

  SliceViews(const Problem& p, const Workload& w, int64_t b, int64_t hk) : problem(p) {
    const int64_t G = group_size(p);
    const int head_dim = 1 + p.rank;  // [B, X..., H, D]
    problem.batch = 1;
    problem.heads = G;
    problem.kv_heads = 1;
    auto queries = [&](const Tensor& t) { return slice(slice(t.ref, 0, b, 1), head_dim, hk * G, G); };
    auto kv = [&](const Tensor& t) { return slice(slice(t.ref, 0, b, 1), head_dim, hk, 1); };
    auto additional = [&](const Tensor& t) { return slice(slice(t.ref, 0, b, 1), 2, hk, 1); };  // [B, M, Hkv, D]

    fwd.query = queries(w.q);
    fwd.key = kv(w.k);
    fwd.value = kv(w.v);
    fwd.rpb = slice(w.rpb.ref, 0, hk * G, G);
    fwd.additional_keys = additional(w.additional_keys);
    fwd.additional_values = additional(w.additional_values);
    fwd.out = queries(w.out);
    fwd.lse = queries(w.lse);

    bwd.query = fwd.query;
    bwd.key = fwd.key;
    bwd.value = fwd.value;
    bwd.rpb = fwd.rpb;
    bwd.additional_keys = fwd.additional_keys;
    bwd.additional_values = fwd.additional_values;
    bwd.out = fwd.out;
    bwd.lse = fwd.lse;
    bwd.d_out = queries(w.d_out);
    bwd.d_query = queries(w.d_q);
    bwd.d_key = kv(w.d_k);
    bwd.d_value = kv(w.d_v);
    bwd.d_additional_keys = additional(w.d_additional_keys);
    bwd.d_additional_values = additional(w.d_additional_values);
  }
};

Status check_forward(const SliceViews& s, cpu::PlainProducts products, std::map<std::string, Tally>* tallies) {
  const Problem& p = s.problem;
  const ForwardTensors& got = s.fwd;

  // Exact: the reference in float64 on the stored input values, lse kept in float64.
  Problem p64 = p;
  p64.dtype = DType::kFloat64;
  const Tensor q = converted(got.query, DType::kFloat64), k = converted(got.key, DType::kFloat64),
               v = converted(got.value, DType::kFloat64), rpb = converted(got.rpb, DType::kFloat64),
               ak = converted(got.additional_keys, DType::kFloat64),
               av = converted(got.additional_values, DType::kFloat64);
  const Tensor out = empty(DType::kFloat64, got.out), lse = empty(DType::kFloat64, got.lse);
  ForwardTensors exact{q.ref, k.ref, v.ref, rpb.ref, ak.ref, av.ref, out.ref, lse.ref};
  NBHD_RETURN_IF_ERROR(cpu::reference_forward(p64, exact, /*plain_low_precision=*/false));

  // Plain: what a straightforward implementation in the problem's dtype gets.
  const Tensor plain_out = empty(p.dtype, got.out), plain_lse = empty(accumulator_dtype(p.dtype), got.lse);
  ForwardTensors plain = got;
  plain.out = plain_out.ref;
  plain.lse = plain_lse.ref;
  NBHD_RETURN_IF_ERROR(cpu::reference_forward(p, plain, /*plain_low_precision=*/true, products));

  (*tallies)["out"].add(got.out, out.ref, &plain_out.ref, p.dtype);
  (*tallies)["lse"].add(got.lse, lse.ref, &plain_lse.ref, accumulator_dtype(p.dtype));
  return Status::Ok();
}

Status check_backward(const SliceViews& s, std::map<std::string, Tally>* tallies) {
  const Problem& p = s.problem;
  const BackwardTensors& got = s.bwd;
  Problem p64 = p;
  p64.dtype = DType::kFloat64;
  auto f64 = [](const TensorRef& t) { return converted(t, DType::kFloat64); };
  const Tensor q = f64(got.query), k = f64(got.key), v = f64(got.value), rpb = f64(got.rpb),
               ak = f64(got.additional_keys), av = f64(got.additional_values), out = f64(got.out),
               lse = f64(got.lse), d_out = f64(got.d_out);
  const Tensor dq = empty(DType::kFloat64, got.d_query), dk = empty(DType::kFloat64, got.d_key),
               dv = empty(DType::kFloat64, got.d_value), dak = empty(DType::kFloat64, got.d_additional_keys),
               dav = empty(DType::kFloat64, got.d_additional_values);
  BackwardTensors exact;
  exact.query = q.ref;
  exact.key = k.ref;
  exact.value = v.ref;
  exact.rpb = rpb.ref;
  exact.additional_keys = ak.ref;
  exact.additional_values = av.ref;
  exact.out = out.ref;
  exact.lse = lse.ref;
  exact.d_out = d_out.ref;
  exact.d_query = dq.ref;
  exact.d_key = dk.ref;
  exact.d_value = dv.ref;
  exact.d_additional_keys = dak.ref;
  exact.d_additional_values = dav.ref;
  NBHD_RETURN_IF_ERROR(cpu::reference_backward(p64, exact));

  (*tallies)["dq"].add(got.d_query, dq.ref, nullptr, p.dtype);
  (*tallies)["dk"].add(got.d_key, dk.ref, nullptr, p.dtype);
  (*tallies)["dv"].add(got.d_value, dv.ref, nullptr, p.dtype);
  if (got.d_additional_keys.defined()) {
    (*tallies)["d_additional_keys"].add(got.d_additional_keys, dak.ref, nullptr, p.dtype);
    (*tallies)["d_additional_values"].add(got.d_additional_values, dav.ref, nullptr, p.dtype);
  }
  return Status::Ok();
}

// Which slices to check: all when they fit, else the first, the last and a seeded
// random choice of the others.
std::vector<int64_t> choose_slices(int64_t total, int64_t count, uint64_t seed) {
  std::vector<int64_t> all(static_cast<size_t>(total));
  std::iota(all.begin(), all.end(), 0);
  if (count >= total) return all;
  std::vector<int64_t> middle(all.begin() + 1, all.end() - 1);
  std::mt19937_64 rng(seed);
  std::shuffle(middle.begin(), middle.end(), rng);
  std::vector<int64_t> chosen{0, total - 1};
  for (int64_t i = 0; int64_t(chosen.size()) < count; ++i) chosen.push_back(middle[size_t(i)]);
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

std::string format_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", x);
  return buf;
}

}  // namespace

bool Verification::pass() const {
  for (const Check& c : checks)
    if (!c.ok()) return false;
  return !checks.empty();
}

const Check* Verification::worst() const {
  const Check* worst = nullptr;
  double worst_ratio = -1;
  for (const Check& c : checks) {
    const double ratio = !c.finite ? INFINITY : c.bound > 0 ? c.err / c.bound : (c.err > 0 ? INFINITY : 0);
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = &c;
    }
  }
  return worst;
}

Status plan_verification(const Problem& p, Pass pass, int64_t* slices) {
  const double cost = slice_cost(p, pass);
  if (cost > kBudgetMultiplyAdds)
    return invalid_argument(
        "--verify: one (batch, kv-head) slice of this problem needs " + format_number(cost) +
        " multiply-adds of reference work, over the budget of " + format_number(kBudgetMultiplyAdds) +
        " (about 8 s); verify a smaller problem of the same shape (fewer tokens, a smaller kernel or fewer heads "
        "per kv head)");
  const int64_t total = p.batch * p.kv_heads;
  *slices = std::min({total, kMaxSlices, std::max<int64_t>(1, int64_t(kBudgetMultiplyAdds / cost))});
  return Status::Ok();
}

bool tf32x3_products(const Problem& p, Backend backend) {
  return p.dtype == DType::kFloat32 && (backend == Backend::kFused || backend == Backend::kGemm);
}

Status verify(const Problem& p, Pass pass, const Workload& host, uint64_t seed, bool tf32x3, Verification* out) {
  const cpu::PlainProducts products = tf32x3 ? cpu::PlainProducts::kTf32x3 : cpu::PlainProducts::kExact;
  int64_t count = 0;
  NBHD_RETURN_IF_ERROR(plan_verification(p, pass, &count));
  const int64_t total = p.batch * p.kv_heads;
  std::map<std::string, Tally> tallies;
  for (int64_t index : choose_slices(total, count, seed)) {
    const SliceViews s(p, host, index / p.kv_heads, index % p.kv_heads);
    NBHD_RETURN_IF_ERROR(check_forward(s, products, &tallies));
    if (pass != Pass::kForward) NBHD_RETURN_IF_ERROR(check_backward(s, &tallies));
  }

  Verification v;
  v.slices_checked = count;
  v.slices_total = total;
  for (const char* tensor : {"out", "lse", "dq", "dk", "dv", "d_additional_keys", "d_additional_values"}) {
    const auto it = tallies.find(tensor);
    if (it == tallies.end()) continue;
    const Tally& t = it->second;
    Check c;
    c.tensor = tensor;
    c.err = t.err;
    c.finite = t.finite;
    const bool forward_tensor = c.tensor == "out" || c.tensor == "lse";
    if (forward_tensor && p.dtype != DType::kFloat64) {
      c.bound = 2 * t.plain_err + 2 * t.noise;
      c.rule = "2*err(plain " + std::string(name(p.dtype)) +
               (products == cpu::PlainProducts::kTf32x3 ? ", 3xTF32 products" : "") + ") + 2*" +
               (c.tensor == "lse" ? name(accumulator_dtype(p.dtype)) : name(p.dtype)) + " rounding noise";
    } else if (forward_tensor) {
      c.bound = kFloat64Bound * std::max(1.0, t.max_ref);
      c.rule = "1e-10 * max(1, max|ref|)";
    } else {
      c.bound = backward_relative_bound(p.dtype) * t.max_ref;
      c.rule = format_number(backward_relative_bound(p.dtype)) + " * max|ref|";
    }
    v.checks.push_back(c);
  }
  if (pass != Pass::kForward && p.has_rpb)
    v.notes.push_back("d_rpb is not verified (it sums over the batch, which slices split)");
  *out = std::move(v);
  return Status::Ok();
}

}  // namespace nbhd::bench
