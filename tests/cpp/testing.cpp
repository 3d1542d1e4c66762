// SPDX-License-Identifier: Apache-2.0
#include "testing.hpp"

#include <algorithm>
#include <limits>

#include "core/tensor_checks.hpp"
#include "cpu/element.hpp"

namespace nbhd::testing {

double HostTensor::get(int64_t i) const { return cpu::load(ref_, offset(i)); }
void HostTensor::set(int64_t i, double v) { cpu::store(ref_, offset(i), v); }

void HostTensor::fill_random(std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  for (int64_t i = 0; i < numel(); ++i) set(i, dist(rng));
}

Problem with_random_box(Problem p, std::mt19937_64& rng) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int a = 0; a < p.rank; ++a) {
    if (uniform(0, 4) == 0) continue;  // the whole axis
    p.query_begin[a] = uniform(0, p.extent[a] - 1);
    p.query_end[a] = uniform(p.query_begin[a] + 1, p.extent[a]);
    if (p.query_end[a] == p.extent[a] && uniform(0, 1)) p.query_end[a] = 0;
  }
  return p;
}

Problem random_problem(std::mt19937_64& rng, const RandomOptions& o) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Problem p;
  p.rank = o.rank;
  p.dtype = o.dtype;
  const int max_extent = o.max_extent ? o.max_extent : (o.rank == 1 ? 40 : o.rank == 2 ? 11 : 6);
  for (int a = 0; a < o.rank; ++a) {
    const int64_t L = uniform(1, max_extent);
    p.extent[a] = L;
    p.kernel[a] = uniform(1, L);
    p.dilation[a] = uniform(1, L / p.kernel[a]);
    p.stride[a] = uniform(1, p.kernel[a]);
    p.causal[a] = uniform(0, 3) == 0;
    if (o.allow_periodic && !p.causal[a]) p.periodic[a] = uniform(0, 1) == 1;
  }
  p.batch = uniform(1, 2);
  p.kv_heads = uniform(1, 2);
  p.heads = p.kv_heads * uniform(1, 2);
  p.dim = uniform(1, 12);
  p.dim_v = uniform(0, 2) == 0 ? uniform(1, 12) : 0;
  if (uniform(0, 2) == 0) p.scale = std::uniform_real_distribution<double>(0.1, 1.5)(rng);
  p.additional_tokens = o.allow_additional && uniform(0, 2) == 0 ? uniform(1, 3) : 0;
  p.has_rpb = o.allow_rpb && uniform(0, 1) == 1;
  return p;
}

namespace {

std::vector<int64_t> token_shape(const Problem& p, int64_t heads, int64_t dim) {
  std::vector<int64_t> s{p.batch};
  for (int a = 0; a < p.rank; ++a) s.push_back(p.extent[a]);
  s.push_back(heads);
  s.push_back(dim);
  return s;
}

}  // namespace

Inputs::Inputs(const Problem& p, std::mt19937_64& rng, int64_t gap)
    : q(p.dtype, detail::query_shape(p, p.heads, p.dim), gap),
      k(p.dtype, token_shape(p, p.kv_heads, p.dim), gap),
      v(p.dtype, token_shape(p, p.kv_heads, p.value_dim()), gap) {
  q.fill_random(rng);
  k.fill_random(rng);
  v.fill_random(rng);
  if (p.has_rpb) {
    std::vector<int64_t> shape{p.heads};
    for (int a = 0; a < p.rank; ++a) shape.push_back(2 * p.kernel[a] - 1);
    rpb = HostTensor(p.dtype, shape, gap);
    rpb.fill_random(rng, 0.5);
  }
  if (p.additional_tokens) {
    ak = HostTensor(p.dtype, {p.batch, p.additional_tokens, p.kv_heads, p.dim}, gap);
    av = HostTensor(p.dtype, {p.batch, p.additional_tokens, p.kv_heads, p.value_dim()}, gap);
    ak.fill_random(rng);
    av.fill_random(rng);
  }
}

DenseResult dense_attention(const Problem& p, const Inputs& in, const HostTensor* d_out, const HostTensor* d_lse) {
  const int r = p.rank;
  const int64_t N = p.tokens(), B = p.batch, H = p.heads, Hkv = p.kv_heads, D = p.dim, Dv = p.value_dim(),
                M = p.additional_tokens, G = H / Hkv;
  const double scale = p.softmax_scale();
  std::vector<SpecAxis> axes;
  for (int a = 0; a < r; ++a)
    axes.push_back({int(p.extent[a]), int(p.kernel[a]), int(p.dilation[a]), int(p.stride[a]), p.causal[a],
                    p.periodic[a]});
  auto coords = [&](int64_t t) {
    std::vector<int> c(r);
    for (int a = r - 1; a >= 0; --a) {
      c[a] = int(t % p.extent[a]);
      t /= p.extent[a];
    }
    return c;
  };
  // mask[t * N + u]: key u is a neighbor of query t (every axis agrees).
  std::vector<char> mask(N * N);
  std::vector<std::vector<int>> rel(N * N);  // rpb index per axis
  for (int64_t t = 0; t < N; ++t)
    for (int64_t u = 0; u < N; ++u) {
      const auto ct = coords(t), cu = coords(u);
      bool ok = true;
      std::vector<int> ri(r);
      for (int a = 0; a < r && ok; ++a) {
        ri[a] = spec_axis_delta(axes[a], ct[a], cu[a]);
        ok = ri[a] >= 0;
      }
      mask[t * N + u] = ok;
      rel[t * N + u] = ri;
    }
  auto rpb_index = [&](int64_t h, const std::vector<int>& ri) {
    int64_t i = h;
    for (int a = 0; a < r; ++a) i = i * (2 * p.kernel[a] - 1) + ri[a];
    return i;
  };
  // Inputs are row-major [B, N, heads, dim].
  auto Q = [&](int64_t b, int64_t t, int64_t h, int64_t d) { return in.q.get(((b * N + t) * H + h) * D + d); };
  auto K = [&](int64_t b, int64_t u, int64_t h, int64_t d) { return in.k.get(((b * N + u) * Hkv + h) * D + d); };
  auto V = [&](int64_t b, int64_t u, int64_t h, int64_t d) { return in.v.get(((b * N + u) * Hkv + h) * Dv + d); };
  auto AK = [&](int64_t b, int64_t m, int64_t h, int64_t d) { return in.ak.get(((b * M + m) * Hkv + h) * D + d); };
  auto AV = [&](int64_t b, int64_t m, int64_t h, int64_t d) { return in.av.get(((b * M + m) * Hkv + h) * Dv + d); };

  DenseResult res;
  res.out.assign(B * N * H * Dv, 0);
  res.lse.assign(B * N * H, 0);
  if (d_out) {
    res.dq.assign(B * N * H * D, 0);
    res.dk.assign(B * N * Hkv * D, 0);
    res.dv.assign(B * N * Hkv * Dv, 0);
    res.drpb.assign(p.has_rpb ? H * p.rpb_size() : 0, 0);
    res.dak.assign(B * M * Hkv * D, 0);
    res.dav.assign(B * M * Hkv * Dv, 0);
  }
  std::vector<double> s(N + M), dp(N + M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t hk = h / G;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t u = 0; u < N + M; ++u) {
          if (u < N && !mask[t * N + u]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += Q(b, t, h, d) * (u < N ? K(b, u, hk, d) : AK(b, u - N, hk, d));
          s[u] = scale * dot;
          if (u < N && p.has_rpb) s[u] += in.rpb.get(rpb_index(h, rel[t * N + u]));
          mx = std::max(mx, s[u]);
        }
        double sum = 0;
        for (int64_t u = 0; u < N + M; ++u)
          if (u >= N || mask[t * N + u]) sum += std::exp(s[u] - mx);
        const double lse = mx + std::log(sum);
        res.lse[(b * N + t) * H + h] = lse;
        for (int64_t u = 0; u < N + M; ++u) {
          if (u < N && !mask[t * N + u]) continue;
          const double prob = std::exp(s[u] - lse);
          for (int64_t d = 0; d < Dv; ++d)
            res.out[((b * N + t) * H + h) * Dv + d] += prob * (u < N ? V(b, u, hk, d) : AV(b, u - N, hk, d));
        }
        if (!d_out) continue;
        auto dO = [&](int64_t d) { return d_out->get(((b * N + t) * H + h) * Dv + d); };
        double delta = 0;
        for (int64_t d = 0; d < Dv; ++d) delta += dO(d) * res.out[((b * N + t) * H + h) * Dv + d];
        if (d_lse) delta -= d_lse->get((b * N + t) * H + h);  // d lse / d score = P
        for (int64_t u = 0; u < N + M; ++u) {
          if (u < N && !mask[t * N + u]) continue;
          const double prob = std::exp(s[u] - lse);
          double g = 0;
          for (int64_t d = 0; d < Dv; ++d) g += dO(d) * (u < N ? V(b, u, hk, d) : AV(b, u - N, hk, d));
          const double ds = prob * (g - delta);
          for (int64_t d = 0; d < D; ++d) {
            res.dq[((b * N + t) * H + h) * D + d] += scale * ds * (u < N ? K(b, u, hk, d) : AK(b, u - N, hk, d));
            (u < N ? res.dk[((b * N + u) * Hkv + hk) * D + d] : res.dak[((b * M + u - N) * Hkv + hk) * D + d]) +=
                scale * ds * Q(b, t, h, d);
          }
          for (int64_t d = 0; d < Dv; ++d)
            (u < N ? res.dv[((b * N + u) * Hkv + hk) * Dv + d] : res.dav[((b * M + u - N) * Hkv + hk) * Dv + d]) +=
                prob * dO(d);
          if (u < N && p.has_rpb) res.drpb[rpb_index(h, rel[t * N + u])] += ds;
        }
      }
  return res;
}

namespace {

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::abs(a[i] - b[i]));
  return e;
}

}  // namespace

void expect_close(const std::string& what, DType dtype, const std::vector<double>& got, const std::vector<double>& ref,
                  const std::vector<double>& plain, double extra_noise) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  ASSERT_EQ(plain.size(), ref.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) ASSERT_TRUE(std::isfinite(got[i])) << what << " element " << i << " is not finite";
  double noise = 0;
  for (double r : ref) noise = std::max(noise, std::abs(round_to(dtype, r + 0.3) - (r + 0.3)));
  const double err = max_abs_diff(got, ref), plain_err = max_abs_diff(plain, ref);
  EXPECT_LE(err, 2 * plain_err + 2 * noise + 2 * extra_noise)
      << what << ": max error " << err << ", plain " << name(dtype) << " implementation's " << plain_err << ", noise "
      << noise << ", other noise " << extra_noise;
}

void expect_near(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref, double atol,
                 double rtol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const double tol = atol + rtol * std::abs(ref[i]);
    if (!(std::abs(got[i] - ref[i]) <= tol)) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << ref[i] << " (tolerance " << tol << ")";
      ++bad;
    }
  }
}

}  // namespace nbhd::testing
