// SPDX-License-Identifier: Apache-2.0
// Problem validation and the counts derived from a problem (pairs, FLOPs, bytes).
#include "nbhd/problem.hpp"

#include <algorithm>
#include <climits>
#include <cmath>

namespace nbhd {
namespace {

std::string axis_param(const char* param, int axis, int64_t value) {
  return std::string(param) + "[axis " + std::to_string(axis) + "] = " + std::to_string(value);
}

// a * b, or false when it would not fit in int64.
bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

Status Problem::validate() const {
  if (rank < 1 || rank > 3)
    return invalid_argument("rank = " + std::to_string(rank) + " is invalid: it must be 1, 2 or 3");
  auto positive = [](const char* what, int64_t v) -> Status {
    if (v >= 1) return Status::Ok();
    return invalid_argument(std::string(what) + " = " + std::to_string(v) + " is invalid: it must be >= 1");
  };
  NBHD_RETURN_IF_ERROR(positive("batch", batch));
  NBHD_RETURN_IF_ERROR(positive("heads", heads));
  NBHD_RETURN_IF_ERROR(positive("kv_heads", kv_heads));
  NBHD_RETURN_IF_ERROR(positive("dim", dim));
  if (dim_v < 0)
    return invalid_argument("dim_v = " + std::to_string(dim_v) + " is invalid: it must be >= 1 (or 0 for dim_v = dim)");
  if (heads % kv_heads != 0)
    return invalid_argument("heads = " + std::to_string(heads) + " is invalid: it must be a multiple of kv_heads = " +
                            std::to_string(kv_heads));
  if (additional_tokens < 0)
    return invalid_argument("additional_tokens = " + std::to_string(additional_tokens) + " is invalid: it must be >= 0");
  if (scale && !std::isfinite(*scale))
    return invalid_argument("scale = " + std::to_string(*scale) + " is invalid: it must be finite");

  for (int a = 0; a < rank; ++a) {
    const int64_t L = extent[a], k = kernel[a], d = dilation[a], s = stride[a];
    if (L < 1 || L > INT_MAX)
      return invalid_argument(axis_param("extent", a, L) + " is invalid: it must be in [1, " + std::to_string(INT_MAX) + "]");
    if (k < 1)
      return invalid_argument(axis_param("kernel_size", a, k) + " is invalid: it must be >= 1");
    if (d < 1)
      return invalid_argument(axis_param("dilation", a, d) + " is invalid: it must be >= 1");
    if (k > L || d > L || k * d > L)
      return invalid_argument(axis_param("kernel_size", a, k) + " with " + axis_param("dilation", a, d) +
                              " is invalid: kernel_size * dilation = " + std::to_string(k * d) +
                              " must be <= the extent " + std::to_string(L) + " of axis " + std::to_string(a));
    if (s < 1 || s > k)
      return invalid_argument(axis_param("stride", a, s) + " is invalid: it must be in [1, kernel_size = " +
                              std::to_string(k) + "]");
    if (periodic[a] && causal[a])
      return invalid_argument("periodic[axis " + std::to_string(a) + "] with causal[axis " + std::to_string(a) +
                              "] is invalid: a periodic axis wraps around and has no before and after; make axis " +
                              std::to_string(a) + " periodic or causal, not both");
  }

  for (int a = 0; a < rank; ++a) {
    const int64_t L = extent[a], begin = query_begin[a], end = query_end[a] ? query_end[a] : L;
    if (begin < 0 || begin >= L)
      return invalid_argument(axis_param("query_begin", a, begin) + " is invalid: it must be in [0, extent = " +
                              std::to_string(L) + ")");
    if (end <= begin || end > L)
      return invalid_argument(axis_param("query_end", a, query_end[a]) + " is invalid: it must be in (query_begin = " +
                              std::to_string(begin) + ", extent = " + std::to_string(L) + "], or 0 for the extent");
  }

  // Every tensor's element count must fit in int64 (offsets are 64-bit everywhere).
  int64_t n = batch, count = 0;
  for (int a = 0; a < rank; ++a)
    if (!mul_fits(n, extent[a], &n)) return invalid_argument("the token grid (batch * extents) overflows 64 bits");
  // Each product checked before it is formed (a signed overflow is undefined).
  int64_t widest = 0, rpb = heads;
  bool fits = mul_fits(std::max(dim, value_dim()), heads, &widest) && mul_fits(n, widest, &count);
  for (int a = 0; a < rank && fits; ++a) fits = mul_fits(rpb, 2 * kernel[a] - 1, &rpb);
  if (!fits) return invalid_argument("a tensor of this problem has more than 2^63 elements");
  return Status::Ok();
}

double Problem::softmax_scale() const { return scale ? *scale : 1.0 / std::sqrt(double(dim)); }

int64_t Problem::tokens() const {
  int64_t n = 1;
  for (int a = 0; a < rank; ++a) n *= extent[a];
  return n;
}

int64_t Problem::query_tokens() const {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= padded_query_range(a).size();
  return n;
}

bool Problem::has_query_box() const {
  for (int a = 0; a < kMaxRank; ++a)
    if (padded_query_range(a).size() != padded_extent(a)) return true;
  return false;
}

int64_t Problem::window_size() const {
  int64_t n = 1;
  for (int a = 0; a < rank; ++a) n *= kernel[a];
  return n;
}

int64_t Problem::rpb_size() const {
  int64_t n = 1;
  for (int a = 0; a < rank; ++a) n *= 2 * kernel[a] - 1;
  return n;
}

int Problem::padded_extent(int a) const {
  const int first = kMaxRank - rank;
  return a < first ? 1 : int(extent[a - first]);
}

Range Problem::padded_query_range(int a) const {
  const int first = kMaxRank - rank;
  if (a < first) return {0, 1};
  const int u = a - first;
  return {int(query_begin[u]), int(query_end[u] ? query_end[u] : extent[u])};
}

Neighborhood Problem::neighborhood() const {
  Neighborhood nb{};
  const int first = kMaxRank - rank;
  for (int a = 0; a < kMaxRank; ++a) {
    Axis& ax = nb.axis[a];
    if (a < first) {
      ax = Axis{};
      continue;
    }
    const int u = a - first;
    ax.length = int(extent[u]);
    ax.kernel = int(kernel[u]);
    ax.dilation = int(dilation[u]);
    ax.stride = int(stride[u]);
    ax.causal = causal[u];
    ax.periodic = periodic[u];
  }
  return nb;
}

int64_t Problem::attended_pairs() const {
  // A token's neighbor count is the product of its per-axis window sizes, so the
  // sum over the query sub-box factors into per-axis sums.
  const Neighborhood nb = neighborhood();
  int64_t pairs = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const Range queries = padded_query_range(a);
    int64_t axis_sum = 0;
    for (int i = queries.begin; i < queries.end; ++i) {
      const int g = i % ax.dilation;
      axis_sum += ax.window(i / ax.dilation, ax.group_length(g)).size();
    }
    pairs *= axis_sum;
  }
  return pairs;
}

double Problem::forward_flops() const {
  const double pairs = double(attended_pairs()) + double(query_tokens()) * double(additional_tokens);
  return 2.0 * double(batch) * double(heads) * pairs * double(dim + value_dim());
}

double Problem::forward_bytes() const {
  const double e = size_of(dtype), n = double(batch) * double(tokens()), nq = double(batch) * double(query_tokens());
  const double q = nq * heads * dim, k = n * kv_heads * dim, v = n * kv_heads * value_dim();
  const double o = nq * heads * value_dim(), lse = nq * heads * 4.0 / e;
  const double extra = double(batch) * additional_tokens * kv_heads * (dim + value_dim());
  return e * (q + k + v + o + lse + extra);
}

// Plain string building, no iostreams: under PyTorch on an H200, the first integer
// written to an ostringstream from this library crashed inside libstdc++'s locale
// code; std::to_string does not touch locales.
std::string Problem::to_string() const {
  std::string s;
  auto axes = [&](const char* label, auto value) {
    s += label;
    for (int a = 0; a < rank; ++a) s += (a ? "x" : "") + std::to_string(value(a));
  };
  axes("extent=", [&](int a) { return extent[a]; });
  axes(" kernel=", [&](int a) { return kernel[a]; });
  axes(" dilation=", [&](int a) { return dilation[a]; });
  axes(" stride=", [&](int a) { return stride[a]; });
  axes(" causal=", [&](int a) { return int(causal[a]); });
  if (periodic[0] || periodic[1] || periodic[2]) axes(" periodic=", [&](int a) { return int(periodic[a]); });
  if (has_query_box()) {
    s += " query_box=";
    for (int a = 0; a < rank; ++a) {
      const Range r = padded_query_range(kMaxRank - rank + a);
      s += (a ? "x" : "") + std::to_string(r.begin) + ":" + std::to_string(r.end);
    }
  }
  s += " batch=" + std::to_string(batch) + " heads=" + std::to_string(heads) + " kv_heads=" +
       std::to_string(kv_heads) + " dim=" + std::to_string(dim) + " dim_v=" + std::to_string(value_dim()) +
       " dtype=" + name(dtype);
  if (additional_tokens) s += " additional=" + std::to_string(additional_tokens);
  if (has_rpb) s += " rpb";
  return s;
}

}  // namespace nbhd
