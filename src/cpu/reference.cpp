// SPDX-License-Identifier: Apache-2.0
// Reference backend (see reference.hpp). One generic path for ranks 1-3: the grid
// is always walked as 3 axes, padded axes having length 1.
#include "cpu/reference.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/layout.hpp"
#include "cpu/box_layout.hpp"
#include "cpu/element.hpp"
#include "dispatch/backend.hpp"

namespace nbhd::cpu {
namespace {

using detail::RpbLayout;
using detail::TokenLayout;

// One neighbor of a query: its token coordinates, its window slot, its rpb index.
struct Neighbor {
  int token[kMaxRank];
  int64_t slot;
  int rpb[kMaxRank];
};

// Calls f(Neighbor) for each neighbor of `query`, in slot order.
template <class F>
void for_each_neighbor(const Neighborhood& nb, const int* query, F&& f) {
  const Neighborhood::Windows w = nb.windows(query);
  Neighbor n{};
  for (int j0 = w.range[0].begin; j0 < w.range[0].end; ++j0)
    for (int j1 = w.range[1].begin; j1 < w.range[1].end; ++j1)
      for (int j2 = w.range[2].begin; j2 < w.range[2].end; ++j2) {
        const int j[kMaxRank] = {j0, j1, j2};
        n.slot = 0;
        for (int a = 0; a < kMaxRank; ++a) {
          const Axis& ax = nb.axis[a];
          n.token[a] = w.group[a] + ax.dilation * ax.wrap(j[a], ax.group_length(w.group[a]));
          n.slot = n.slot * ax.kernel + (j[a] - w.range[a].begin);
          n.rpb[a] = Neighborhood::rpb_entry(ax, query[a], j[a]);
        }
        f(n);
      }
}

// Calls f(b, token) for every token of the box `r` (grid coordinates, per padded axis).
template <class F>
void for_each_token_in(const Problem& p, const Range* r, F&& f) {
  for (int64_t b = 0; b < p.batch; ++b)
    for (int x0 = r[0].begin; x0 < r[0].end; ++x0)
      for (int x1 = r[1].begin; x1 < r[1].end; ++x1)
        for (int x2 = r[2].begin; x2 < r[2].end; ++x2) {
          const int t[kMaxRank] = {x0, x1, x2};
          f(b, t);
        }
}

// Calls f(b, token) for every token of the grid.
template <class F>
void for_each_token(const Problem& p, F&& f) {
  const Range grid[kMaxRank] = {{0, p.padded_extent(0)}, {0, p.padded_extent(1)}, {0, p.padded_extent(2)}};
  for_each_token_in(p, grid, f);
}

// Calls f(b, token) for every query of the query sub-box (grid coordinates).
template <class F>
void for_each_query(const Problem& p, F&& f) {
  const Range box[kMaxRank] = {p.padded_query_range(0), p.padded_query_range(1), p.padded_query_range(2)};
  for_each_token_in(p, box, f);
}

double dot(const TensorRef& a, int64_t oa, int64_t sa, const TensorRef& b, int64_t ob, int64_t sb, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += load(a, oa + i * sa) * load(b, ob + i * sb);
  return s;
}

// Everything the loops need about one problem's tensors.
struct Views {
  Neighborhood nb;
  double scale;
  int64_t group;  // query heads per kv head
  BoxLayout q;    // the query sub-box's tokens
  TokenLayout k, v, ak, av;
  RpbLayout rpb;

  Views(const Problem& p, const TensorRef& q_, const TensorRef& k_, const TensorRef& v_, const TensorRef& rpb_,
        const TensorRef& ak_, const TensorRef& av_)
      : nb(p.neighborhood()), scale(p.softmax_scale()), group(p.heads_per_kv()) {
    q = query_layout(q_, p);
    k = detail::token_layout(k_, p.rank);
    v = detail::token_layout(v_, p.rank);
    rpb = detail::rpb_layout(rpb_, p.rank);
    ak = detail::token_layout(ak_, 1);
    av = detail::token_layout(av_, 1);
  }
};

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// cvt.rna.tf32.f32: float32 rounded to 10 mantissa bits, nearest, ties away from zero.
float round_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace

double tf32x3_product(double x, double y) {
  const float xf = float(x), yf = float(y);
  const double xh = round_to_tf32(xf), yh = round_to_tf32(yf);
  const double xl = round_to_tf32(float(xf - xh)), yl = round_to_tf32(float(yf - yh));
  return xh * yl + xl * yh + xh * yh;
}

Status reference_forward(const Problem& p, const ForwardTensors& t, bool plain_low_precision, PlainProducts products) {
  Views s(p, t.query, t.key, t.value, t.rpb, t.additional_keys, t.additional_values);
  const BoxLayout o = query_layout(t.out, p);
  const BoxLayout lse = query_layout(t.lse, p, /*has_inner=*/false);
  const int64_t D = p.dim, Dv = p.value_dim(), M = p.additional_tokens;
  // A plain implementation in a low precision accumulates in float32 (float64 for
  // float64 problems) and stores scores and probabilities in the dtype.
  const bool f32_accumulate = plain_low_precision && p.dtype != DType::kFloat64;
  auto acc = [&](double x) { return f32_accumulate ? double(float(x)) : x; };
  auto stored = [&](double x) { return plain_low_precision ? round_to(p.dtype, x) : x; };
  const bool tf32x3 = plain_low_precision && products == PlainProducts::kTf32x3;
  auto product = [&](double x, double y) { return tf32x3 ? tf32x3_product(x, y) : x * y; };
  auto dot_acc = [&](const TensorRef& a, int64_t oa, int64_t sa, const TensorRef& b, int64_t ob, int64_t sb) {
    double sum = 0;
    for (int64_t i = 0; i < D; ++i) sum = acc(sum + acc(product(load(a, oa + i * sa), load(b, ob + i * sb))));
    return sum;
  };

  struct Term {
    double score;
    const TensorRef* value;
    int64_t value_offset, value_stride;
  };
  std::vector<Term> terms;
  std::vector<double> out(Dv);
  for_each_query(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t hk = h / s.group;
      const int64_t qo = s.q.offset(b, x, h);
      terms.clear();
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        double score = acc(s.scale * dot_acc(t.query, qo, s.q.inner, t.key, s.k.offset(b, n.token, hk), s.k.inner));
        if (t.rpb.defined()) score = acc(score + load(t.rpb, s.rpb.offset(h, n.rpb)));
        terms.push_back({stored(score), &t.value, s.v.offset(b, n.token, hk), s.v.inner});
      });
      for (int64_t m = 0; m < M; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        const double score =
            acc(s.scale * dot_acc(t.query, qo, s.q.inner, t.additional_keys, s.ak.offset(b, mt, hk), s.ak.inner));
        terms.push_back({stored(score), &t.additional_values, s.av.offset(b, mt, hk), s.av.inner});
      }
      double mx = kNegInf;
      for (const Term& term : terms) mx = std::max(mx, term.score);
      double sum = 0;
      for (const Term& term : terms) sum = acc(sum + acc(std::exp(term.score - mx)));
      const double log_sum = acc(mx + std::log(sum));
      std::fill(out.begin(), out.end(), 0.0);
      for (const Term& term : terms) {
        const double prob = stored(acc(std::exp(term.score - log_sum)));
        for (int64_t d = 0; d < Dv; ++d)
          out[d] = acc(out[d] + acc(product(prob, load(*term.value, term.value_offset + d * term.value_stride))));
      }
      const int64_t oo = o.offset(b, x, h);
      for (int64_t d = 0; d < Dv; ++d) store(t.out, oo + d * o.inner, out[d]);
      if (t.lse.defined()) store(t.lse, lse.offset(b, x, h), log_sum);
    }
  });
  return Status::Ok();
}

Status reference_backward(const Problem& p, const BackwardTensors& t) {
  Views s(p, t.query, t.key, t.value, t.rpb, t.additional_keys, t.additional_values);
  const BoxLayout dO = query_layout(t.d_out, p);
  const BoxLayout d_lse = query_layout(t.d_lse, p, /*has_inner=*/false);
  const int64_t D = p.dim, Dv = p.value_dim(), M = p.additional_tokens;
  const int64_t N = p.tokens(), B = p.batch, H = p.heads, Hkv = p.kv_heads;

  // Gradients accumulate in float64, in dense [B, tokens, heads, dim] buffers over the
  // grid (dq: only the query sub-box's rows are written).
  const int e1 = p.padded_extent(1), e2 = p.padded_extent(2);
  auto flat = [&](int64_t b, const int* x) { return (b * N + (int64_t(x[0]) * e1 + x[1]) * e2 + x[2]); };
  std::vector<double> dq(B * N * H * D), dk(B * N * Hkv * D), dv(B * N * Hkv * Dv);
  std::vector<double> dak(B * M * Hkv * D), dav(B * M * Hkv * Dv), drpb(H * p.rpb_size());
  RpbLayout drpb_layout;  // dense [H, 2k-1 ...] padded to 3 axes
  {
    const Neighborhood nb = s.nb;
    drpb_layout.axis[2] = 1;
    drpb_layout.axis[1] = 2 * nb.axis[2].kernel - 1;
    drpb_layout.axis[0] = drpb_layout.axis[1] * (2 * nb.axis[1].kernel - 1);
    drpb_layout.head = drpb_layout.axis[0] * (2 * nb.axis[0].kernel - 1);
  }

  struct Term {
    double score;
    int64_t key_row, value_row;  // dense rows (neighbor) or additional-token rows
    bool additional;
    int64_t key_off, value_off;  // offsets into the input tensors
    int rpb[kMaxRank];
  };
  std::vector<Term> terms;
  for_each_query(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / s.group;
      const int64_t qo = s.q.offset(b, x, h);
      terms.clear();
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        Term term{};
        term.key_off = s.k.offset(b, n.token, hk);
        term.value_off = s.v.offset(b, n.token, hk);
        term.score = s.scale * dot(t.query, qo, s.q.inner, t.key, term.key_off, s.k.inner, D);
        if (t.rpb.defined()) term.score += load(t.rpb, s.rpb.offset(h, n.rpb));
        term.key_row = term.value_row = flat(b, n.token) * Hkv + hk;
        for (int a = 0; a < kMaxRank; ++a) term.rpb[a] = n.rpb[a];
        terms.push_back(term);
      });
      for (int64_t m = 0; m < M; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        Term term{};
        term.additional = true;
        term.key_off = s.ak.offset(b, mt, hk);
        term.value_off = s.av.offset(b, mt, hk);
        term.score = s.scale * dot(t.query, qo, s.q.inner, t.additional_keys, term.key_off, s.ak.inner, D);
        term.key_row = term.value_row = (b * M + m) * Hkv + hk;
        terms.push_back(term);
      }
      double mx = kNegInf;
      for (const Term& term : terms) mx = std::max(mx, term.score);
      double sum = 0;
      for (const Term& term : terms) sum += std::exp(term.score - mx);
      const double log_sum = mx + std::log(sum);

      const int64_t doo = dO.offset(b, x, h);
      // delta = sum_u P_u <dO, v_u> = <dO, out> in exact arithmetic.
      std::vector<double> dp(terms.size());
      double delta = 0;
      for (size_t i = 0; i < terms.size(); ++i) {
        const Term& term = terms[i];
        const TensorRef& vt = term.additional ? t.additional_values : t.value;
        const int64_t vs = term.additional ? s.av.inner : s.v.inner;
        dp[i] = dot(t.d_out, doo, dO.inner, vt, term.value_off, vs, Dv);
        delta += std::exp(term.score - log_sum) * dp[i];
      }
      if (t.d_lse.defined()) delta -= load(t.d_lse, d_lse.offset(b, x, h));
      double* dq_row = &dq[(flat(b, x) * H + h) * D];
      for (size_t i = 0; i < terms.size(); ++i) {
        const Term& term = terms[i];
        const double prob = std::exp(term.score - log_sum);
        const double ds = prob * (dp[i] - delta);
        const TensorRef& kt = term.additional ? t.additional_keys : t.key;
        const int64_t ks = term.additional ? s.ak.inner : s.k.inner;
        double* dk_row = term.additional ? &dak[term.key_row * D] : &dk[term.key_row * D];
        double* dv_row = term.additional ? &dav[term.value_row * Dv] : &dv[term.value_row * Dv];
        for (int64_t d = 0; d < D; ++d) {
          dq_row[d] += s.scale * ds * load(kt, term.key_off + d * ks);
          dk_row[d] += s.scale * ds * load(t.query, qo + d * s.q.inner);
        }
        for (int64_t d = 0; d < Dv; ++d) dv_row[d] += prob * load(t.d_out, doo + d * dO.inner);
        if (!term.additional) drpb[drpb_layout.offset(h, term.rpb)] += ds;
      }
    }
  });

  // Write the float64 sums into the caller's tensors.
  const BoxLayout dql = query_layout(t.d_query, p);
  const TokenLayout dkl = detail::token_layout(t.d_key, p.rank), dvl = detail::token_layout(t.d_value, p.rank);
  for_each_query(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) store(t.d_query, dql.offset(b, x, h) + d * dql.inner, dq[(flat(b, x) * H + h) * D + d]);
  });
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t d = 0; d < D; ++d) store(t.d_key, dkl.offset(b, x, h) + d * dkl.inner, dk[(flat(b, x) * Hkv + h) * D + d]);
      for (int64_t d = 0; d < Dv; ++d)
        store(t.d_value, dvl.offset(b, x, h) + d * dvl.inner, dv[(flat(b, x) * Hkv + h) * Dv + d]);
    }
  });
  if (M > 0) {
    const TokenLayout dakl = detail::token_layout(t.d_additional_keys, 1),
                      davl = detail::token_layout(t.d_additional_values, 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t h = 0; h < Hkv; ++h) {
          const int mt[kMaxRank] = {0, 0, int(m)};
          const int64_t row = (b * M + m) * Hkv + h;
          if (t.d_additional_keys.defined())
            for (int64_t d = 0; d < D; ++d)
              store(t.d_additional_keys, dakl.offset(b, mt, h) + d * dakl.inner, dak[row * D + d]);
          if (t.d_additional_values.defined())
            for (int64_t d = 0; d < Dv; ++d)
              store(t.d_additional_values, davl.offset(b, mt, h) + d * davl.inner, dav[row * Dv + d]);
        }
  }
  if (t.d_rpb.defined()) {
    const RpbLayout out = detail::rpb_layout(t.d_rpb, p.rank);
    const Neighborhood& nb = s.nb;
    for (int64_t h = 0; h < H; ++h)
      for (int i0 = 0; i0 < 2 * nb.axis[0].kernel - 1; ++i0)
        for (int i1 = 0; i1 < 2 * nb.axis[1].kernel - 1; ++i1)
          for (int i2 = 0; i2 < 2 * nb.axis[2].kernel - 1; ++i2) {
            const int idx[kMaxRank] = {i0, i1, i2};
            store(t.d_rpb, out.offset(h, idx), drpb[drpb_layout.offset(h, idx)]);
          }
  }
  return Status::Ok();
}

// ---------------------------------------------------------------- unfused ops
// attn [B, X..., H, W + M]: slot w < W is the neighbor at window offset w (row-major
// over axes); slots a causal window does not reach hold -inf; slot W + m is
// additional token m.

namespace {

int64_t window_slots(const Neighborhood& nb) {
  return int64_t(nb.axis[0].kernel) * nb.axis[1].kernel * nb.axis[2].kernel;
}

}  // namespace

Status reference_qk(const Problem& p, const QkTensors& t) {
  Views s(p, t.query, t.key, TensorRef{}, t.rpb, t.additional_keys, TensorRef{});
  const TokenLayout a = detail::token_layout(t.attn, p.rank);
  const int64_t W = window_slots(s.nb), D = p.dim;
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t hk = h / s.group, qo = s.q.offset(b, x, h), ao = a.offset(b, x, h);
      for (int64_t w = 0; w < W; ++w) store(t.attn, ao + w * a.inner, kNegInf);
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        double score = s.scale * dot(t.query, qo, s.q.inner, t.key, s.k.offset(b, n.token, hk), s.k.inner, D);
        if (t.rpb.defined()) score += load(t.rpb, s.rpb.offset(h, n.rpb));
        store(t.attn, ao + n.slot * a.inner, score);
      });
      for (int64_t m = 0; m < p.additional_tokens; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        store(t.attn, ao + (W + m) * a.inner,
              s.scale * dot(t.query, qo, s.q.inner, t.additional_keys, s.ak.offset(b, mt, hk), s.ak.inner, D));
      }
    }
  });
  return Status::Ok();
}

Status reference_qk_backward(const Problem& p, const QkBackwardTensors& t) {
  Views s(p, t.query, t.key, TensorRef{}, TensorRef{}, t.additional_keys, TensorRef{});
  const TokenLayout da = detail::token_layout(t.d_attn, p.rank);
  const TokenLayout dql = detail::token_layout(t.d_query, p.rank), dkl = detail::token_layout(t.d_key, p.rank);
  const TokenLayout dakl = detail::token_layout(t.d_additional_keys, 1);
  const RpbLayout drl = detail::rpb_layout(t.d_rpb, p.rank);
  const int64_t W = window_slots(s.nb), D = p.dim, M = p.additional_tokens, N = p.tokens();
  const int e1 = p.padded_extent(1), e2 = p.padded_extent(2);
  auto flat = [&](int64_t b, const int* x) { return (b * N + (int64_t(x[0]) * e1 + x[1]) * e2 + x[2]); };
  std::vector<double> dk(p.batch * N * p.kv_heads * D), dak(p.batch * M * p.kv_heads * D);
  std::vector<double> drpb(p.heads * p.rpb_size());
  const int r1 = 2 * s.nb.axis[1].kernel - 1, r2 = 2 * s.nb.axis[2].kernel - 1;
  std::vector<double> dq(D);
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t hk = h / s.group, qo = s.q.offset(b, x, h), ao = da.offset(b, x, h);
      std::fill(dq.begin(), dq.end(), 0.0);
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        const double g = load(t.d_attn, ao + n.slot * da.inner);
        const int64_t ko = s.k.offset(b, n.token, hk);
        double* dk_row = &dk[(flat(b, n.token) * p.kv_heads + hk) * D];
        for (int64_t d = 0; d < D; ++d) {
          dq[d] += s.scale * g * load(t.key, ko + d * s.k.inner);
          dk_row[d] += s.scale * g * load(t.query, qo + d * s.q.inner);
        }
        drpb[(h * (2 * s.nb.axis[0].kernel - 1) + n.rpb[0]) * r1 * r2 + n.rpb[1] * r2 + n.rpb[2]] += g;
      });
      for (int64_t m = 0; m < M; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        const double g = load(t.d_attn, ao + (W + m) * da.inner);
        const int64_t ko = s.ak.offset(b, mt, hk);
        double* dk_row = &dak[((b * M + m) * p.kv_heads + hk) * D];
        for (int64_t d = 0; d < D; ++d) {
          dq[d] += s.scale * g * load(t.additional_keys, ko + d * s.ak.inner);
          dk_row[d] += s.scale * g * load(t.query, qo + d * s.q.inner);
        }
      }
      for (int64_t d = 0; d < D; ++d) store(t.d_query, dql.offset(b, x, h) + d * dql.inner, dq[d]);
    }
  });
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.kv_heads; ++h)
      for (int64_t d = 0; d < D; ++d)
        store(t.d_key, dkl.offset(b, x, h) + d * dkl.inner, dk[(flat(b, x) * p.kv_heads + h) * D + d]);
  });
  if (t.d_additional_keys.defined())
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t h = 0; h < p.kv_heads; ++h) {
          const int mt[kMaxRank] = {0, 0, int(m)};
          for (int64_t d = 0; d < D; ++d)
            store(t.d_additional_keys, dakl.offset(b, mt, h) + d * dakl.inner, dak[((b * M + m) * p.kv_heads + h) * D + d]);
        }
  if (t.d_rpb.defined()) {
    const int r0 = 2 * s.nb.axis[0].kernel - 1;
    for (int64_t h = 0; h < p.heads; ++h)
      for (int i0 = 0; i0 < r0; ++i0)
        for (int i1 = 0; i1 < r1; ++i1)
          for (int i2 = 0; i2 < r2; ++i2) {
            const int idx[kMaxRank] = {i0, i1, i2};
            store(t.d_rpb, drl.offset(h, idx), drpb[(h * r0 + i0) * r1 * r2 + i1 * r2 + i2]);
          }
  }
  return Status::Ok();
}

Status reference_softmax(const Problem& p, const SoftmaxTensors& t) {
  const TokenLayout a = detail::token_layout(t.attn, p.rank), o = detail::token_layout(t.probs, p.rank);
  const int64_t slots = p.window_size() + p.additional_tokens;
  std::vector<double> row(slots);
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      double mx = kNegInf, sum = 0;
      for (int64_t w = 0; w < slots; ++w) mx = std::max(mx, row[w] = load(t.attn, a.offset(b, x, h) + w * a.inner));
      for (int64_t w = 0; w < slots; ++w) sum += std::exp(row[w] - mx);
      for (int64_t w = 0; w < slots; ++w) store(t.probs, o.offset(b, x, h) + w * o.inner, std::exp(row[w] - mx) / sum);
    }
  });
  return Status::Ok();
}

Status reference_softmax_backward(const Problem& p, const SoftmaxBackwardTensors& t) {
  const TokenLayout pl = detail::token_layout(t.probs, p.rank), gl = detail::token_layout(t.d_probs, p.rank),
                    ol = detail::token_layout(t.d_attn, p.rank);
  const int64_t slots = p.window_size() + p.additional_tokens;
  std::vector<double> prob(slots), grad(slots);
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      double dot_pg = 0;
      for (int64_t w = 0; w < slots; ++w) {
        prob[w] = load(t.probs, pl.offset(b, x, h) + w * pl.inner);
        grad[w] = load(t.d_probs, gl.offset(b, x, h) + w * gl.inner);
        dot_pg += prob[w] * grad[w];
      }
      for (int64_t w = 0; w < slots; ++w) store(t.d_attn, ol.offset(b, x, h) + w * ol.inner, prob[w] * (grad[w] - dot_pg));
    }
  });
  return Status::Ok();
}

Status reference_av(const Problem& p, const AvTensors& t) {
  Views s(p, TensorRef{}, TensorRef{}, t.value, TensorRef{}, TensorRef{}, t.additional_values);
  const TokenLayout a = detail::token_layout(t.probs, p.rank), o = detail::token_layout(t.out, p.rank);
  const int64_t W = window_slots(s.nb), Dv = p.value_dim();
  std::vector<double> out(Dv);
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t hk = h / s.group, ao = a.offset(b, x, h);
      std::fill(out.begin(), out.end(), 0.0);
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        const double w = load(t.probs, ao + n.slot * a.inner);
        const int64_t vo = s.v.offset(b, n.token, hk);
        for (int64_t d = 0; d < Dv; ++d) out[d] += w * load(t.value, vo + d * s.v.inner);
      });
      for (int64_t m = 0; m < p.additional_tokens; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        const double w = load(t.probs, ao + (W + m) * a.inner);
        const int64_t vo = s.av.offset(b, mt, hk);
        for (int64_t d = 0; d < Dv; ++d) out[d] += w * load(t.additional_values, vo + d * s.av.inner);
      }
      for (int64_t d = 0; d < Dv; ++d) store(t.out, o.offset(b, x, h) + d * o.inner, out[d]);
    }
  });
  return Status::Ok();
}

Status reference_av_backward(const Problem& p, const AvBackwardTensors& t) {
  Views s(p, TensorRef{}, TensorRef{}, t.value, TensorRef{}, TensorRef{}, t.additional_values);
  const TokenLayout a = detail::token_layout(t.probs, p.rank), g = detail::token_layout(t.d_out, p.rank);
  const TokenLayout dpl = detail::token_layout(t.d_probs, p.rank), dvl = detail::token_layout(t.d_value, p.rank);
  const TokenLayout davl = detail::token_layout(t.d_additional_values, 1);
  const int64_t W = window_slots(s.nb), Dv = p.value_dim(), M = p.additional_tokens, N = p.tokens();
  const int e1 = p.padded_extent(1), e2 = p.padded_extent(2);
  auto flat = [&](int64_t b, const int* x) { return (b * N + (int64_t(x[0]) * e1 + x[1]) * e2 + x[2]); };
  std::vector<double> dv(p.batch * N * p.kv_heads * Dv), dav(p.batch * M * p.kv_heads * Dv);
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t hk = h / s.group, ao = a.offset(b, x, h), go = g.offset(b, x, h), dpo = dpl.offset(b, x, h);
      for (int64_t w = 0; w < W; ++w) store(t.d_probs, dpo + w * dpl.inner, 0.0);
      for_each_neighbor(s.nb, x, [&](const Neighbor& n) {
        const int64_t vo = s.v.offset(b, n.token, hk);
        const double w = load(t.probs, ao + n.slot * a.inner);
        store(t.d_probs, dpo + n.slot * dpl.inner, dot(t.d_out, go, g.inner, t.value, vo, s.v.inner, Dv));
        double* dv_row = &dv[(flat(b, n.token) * p.kv_heads + hk) * Dv];
        for (int64_t d = 0; d < Dv; ++d) dv_row[d] += w * load(t.d_out, go + d * g.inner);
      });
      for (int64_t m = 0; m < M; ++m) {
        const int mt[kMaxRank] = {0, 0, int(m)};
        const int64_t vo = s.av.offset(b, mt, hk);
        const double w = load(t.probs, ao + (W + m) * a.inner);
        store(t.d_probs, dpo + (W + m) * dpl.inner, dot(t.d_out, go, g.inner, t.additional_values, vo, s.av.inner, Dv));
        double* dv_row = &dav[((b * M + m) * p.kv_heads + hk) * Dv];
        for (int64_t d = 0; d < Dv; ++d) dv_row[d] += w * load(t.d_out, go + d * g.inner);
      }
    }
  });
  for_each_token(p, [&](int64_t b, const int* x) {
    for (int64_t h = 0; h < p.kv_heads; ++h)
      for (int64_t d = 0; d < Dv; ++d)
        store(t.d_value, dvl.offset(b, x, h) + d * dvl.inner, dv[(flat(b, x) * p.kv_heads + h) * Dv + d]);
  });
  if (t.d_additional_values.defined())
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t h = 0; h < p.kv_heads; ++h) {
          const int mt[kMaxRank] = {0, 0, int(m)};
          for (int64_t d = 0; d < Dv; ++d)
            store(t.d_additional_values, davl.offset(b, mt, h) + d * davl.inner,
                  dav[((b * M + m) * p.kv_heads + h) * Dv + d]);
        }
  return Status::Ok();
}

}  // namespace nbhd::cpu

// ---------------------------------------------------------------- registration
namespace nbhd::detail {
namespace {

Status reference_supports(const Problem& p, Pass pass) {
  if (pass == Pass::kUnfused && p.has_query_box())
    return unsupported("query sub-box: the unfused operations compute every query of the grid (forward and "
                       "backward run a sub-box)");
  return Status::Ok();
}

Status forward_entry(const Problem& p, const ForwardTensors& t, const Options&) {
  return cpu::reference_forward(p, t, /*plain_low_precision=*/false);
}
Status backward_entry(const Problem& p, const BackwardTensors& t, const Options&) {
  return cpu::reference_backward(p, t);
}

const UnfusedImpl kReferenceUnfused = {
    [](const Problem& p, const QkTensors& t, const Options&) { return cpu::reference_qk(p, t); },
    [](const Problem& p, const QkBackwardTensors& t, const Options&) { return cpu::reference_qk_backward(p, t); },
    [](const Problem& p, const SoftmaxTensors& t, const Options&) { return cpu::reference_softmax(p, t); },
    [](const Problem& p, const SoftmaxBackwardTensors& t, const Options&) {
      return cpu::reference_softmax_backward(p, t);
    },
    [](const Problem& p, const AvTensors& t, const Options&) { return cpu::reference_av(p, t); },
    [](const Problem& p, const AvBackwardTensors& t, const Options&) { return cpu::reference_av_backward(p, t); },
};

}  // namespace

extern const BackendImpl kReferenceBackend = {Backend::kReference, Device::kCPU, reference_supports, forward_entry,
                                              backward_entry, &kReferenceUnfused, /*unfolds_short_groups=*/false,
                                              /*runs_periodic=*/true};

}  // namespace nbhd::detail
