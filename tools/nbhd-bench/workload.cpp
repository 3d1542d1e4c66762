// SPDX-License-Identifier: Apache-2.0
#include "workload.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>

namespace nbhd::bench {
namespace {

// splitmix64: a fast, portable generator, so the same seed gives the same inputs
// with every standard library (std::normal_distribution's output is unspecified).
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1]: never 0, so log() below is finite.
  double uniform() { return (double(next() >> 11) + 1.0) * 0x1.0p-53; }
};

void store(void* base, DType t, int64_t i, double v) {
  switch (t) {
    case DType::kFloat16: static_cast<half_bits*>(base)[i] = to_half(float(v)); return;
    case DType::kBFloat16: static_cast<bfloat16_bits*>(base)[i] = to_bfloat16(float(v)); return;
    case DType::kFloat32: static_cast<float*>(base)[i] = float(v); return;
    case DType::kFloat64: static_cast<double*>(base)[i] = v; return;
  }
}

double load(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return to_float(static_cast<const half_bits*>(base)[i]);
    case DType::kBFloat16: return to_float(static_cast<const bfloat16_bits*>(base)[i]);
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat64: return static_cast<const double*>(base)[i];
  }
  return 0;
}

// Normal(0, scale) values (Box-Muller), nudged away from exact zero after rounding
// to the dtype, uploaded to `t`. Chunks of 2^20 values have their own streams (the
// chunk's index mixed into the seed) and are filled in parallel: one thread took
// 1-4 s per problem of the Hopper sweeps (50-130 M values), each run of a row.
Status fill_normal(Tensor& t, uint64_t seed, double scale) {
  constexpr int64_t kChunk = int64_t(1) << 20;  // even: Box-Muller pairs stay in a chunk
  const int64_t n = t.ref.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<unsigned char> host(t.buffer.bytes());
  auto fill_chunk = [&](int64_t c) {
    SplitMix64 rng{seed + uint64_t(c) * 0xd1b54a32d192ed03ull};
    for (int64_t i = c * kChunk, end = std::min(n, i + kChunk); i < end; i += 2) {
      const double radius = scale * std::sqrt(-2.0 * std::log(rng.uniform()));
      const double angle = 2.0 * M_PI * rng.uniform();
      const double pair[2] = {radius * std::cos(angle), radius * std::sin(angle)};
      for (int64_t j = 0; j < 2 && i + j < end; ++j) {
        const double x = pair[j];
        store(host.data(), t.ref.dtype, i + j, x);
        if (load(host.data(), t.ref.dtype, i + j) == 0.0) store(host.data(), t.ref.dtype, i + j, x < 0 ? -1e-3 : 1e-3);
      }
    }
  };
  const int64_t workers = std::min<int64_t>(chunks, std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w)
    pool.emplace_back([&] {
      for (int64_t c; (c = next++) < chunks;) fill_chunk(c);
    });
  for (int64_t c; (c = next++) < chunks;) fill_chunk(c);
  for (std::thread& th : pool) th.join();
  return t.buffer.upload(host.data());
}

std::vector<int64_t> token_shape(const Problem& p, int64_t heads, int64_t dim) {
  std::vector<int64_t> s{p.batch};
  for (int a = 0; a < p.rank; ++a) s.push_back(p.extent[a]);
  s.push_back(heads);
  if (dim > 0) s.push_back(dim);
  return s;
}

// The query side (q, out, lse, d out, d q): the query sub-box's tokens.
std::vector<int64_t> query_shape(const Problem& p, int64_t heads, int64_t dim) {
  std::vector<int64_t> s = token_shape(p, heads, dim);
  for (int a = 0; a < p.rank; ++a) s[1 + a] = p.padded_query_range(kMaxRank - p.rank + a).size();
  return s;
}

// Every tensor gets its own stream of random numbers.
uint64_t tensor_seed(uint64_t seed, int which) { return seed * 1000003ull + uint64_t(which) * 0x632be59bd9b4e019ull; }

}  // namespace

Status Workload::create(const Problem& p, Device device, bool with_backward, uint64_t seed, Workload* out) {
  Workload w;
  const DType dt = p.dtype;
  const int64_t H = p.heads, Hkv = p.kv_heads, D = p.dim, Dv = p.value_dim(), M = p.additional_tokens;
  auto make = [&](Tensor* t, DType dtype, const std::vector<int64_t>& shape) {
    return Tensor::allocate(device, dtype, shape, t);
  };
  NBHD_RETURN_IF_ERROR(make(&w.q, dt, query_shape(p, H, D)));
  NBHD_RETURN_IF_ERROR(make(&w.k, dt, token_shape(p, Hkv, D)));
  NBHD_RETURN_IF_ERROR(make(&w.v, dt, token_shape(p, Hkv, Dv)));
  NBHD_RETURN_IF_ERROR(fill_normal(w.q, tensor_seed(seed, 0), 1.0));
  NBHD_RETURN_IF_ERROR(fill_normal(w.k, tensor_seed(seed, 1), 1.0));
  NBHD_RETURN_IF_ERROR(fill_normal(w.v, tensor_seed(seed, 2), 1.0));
  std::vector<int64_t> rpb_shape{H};
  for (int a = 0; a < p.rank; ++a) rpb_shape.push_back(2 * p.kernel[a] - 1);
  if (p.has_rpb) {
    NBHD_RETURN_IF_ERROR(make(&w.rpb, dt, rpb_shape));
    NBHD_RETURN_IF_ERROR(fill_normal(w.rpb, tensor_seed(seed, 3), 0.5));
  }
  if (M > 0) {
    NBHD_RETURN_IF_ERROR(make(&w.additional_keys, dt, {p.batch, M, Hkv, D}));
    NBHD_RETURN_IF_ERROR(make(&w.additional_values, dt, {p.batch, M, Hkv, Dv}));
    NBHD_RETURN_IF_ERROR(fill_normal(w.additional_keys, tensor_seed(seed, 4), 1.0));
    NBHD_RETURN_IF_ERROR(fill_normal(w.additional_values, tensor_seed(seed, 5), 1.0));
  }
  // Outputs start as NaN (all bits set is a NaN in every float format).
  NBHD_RETURN_IF_ERROR(make(&w.out, dt, query_shape(p, H, Dv)));
  NBHD_RETURN_IF_ERROR(make(&w.lse, accumulator_dtype(dt), query_shape(p, H, 0)));
  NBHD_RETURN_IF_ERROR(w.out.buffer.fill_bytes(0xff));
  NBHD_RETURN_IF_ERROR(w.lse.buffer.fill_bytes(0xff));
  if (with_backward) {
    NBHD_RETURN_IF_ERROR(make(&w.d_out, dt, query_shape(p, H, Dv)));
    NBHD_RETURN_IF_ERROR(fill_normal(w.d_out, tensor_seed(seed, 6), 1.0));
    NBHD_RETURN_IF_ERROR(make(&w.d_q, dt, query_shape(p, H, D)));
    NBHD_RETURN_IF_ERROR(make(&w.d_k, dt, token_shape(p, Hkv, D)));
    NBHD_RETURN_IF_ERROR(make(&w.d_v, dt, token_shape(p, Hkv, Dv)));
    for (Tensor* g : {&w.d_q, &w.d_k, &w.d_v}) NBHD_RETURN_IF_ERROR(g->buffer.fill_bytes(0xff));
    if (p.has_rpb) {
      NBHD_RETURN_IF_ERROR(make(&w.d_rpb, accumulator_dtype(dt), rpb_shape));
      NBHD_RETURN_IF_ERROR(w.d_rpb.buffer.fill_bytes(0xff));
    }
    if (M > 0) {
      NBHD_RETURN_IF_ERROR(make(&w.d_additional_keys, dt, {p.batch, M, Hkv, D}));
      NBHD_RETURN_IF_ERROR(make(&w.d_additional_values, dt, {p.batch, M, Hkv, Dv}));
      NBHD_RETURN_IF_ERROR(w.d_additional_keys.buffer.fill_bytes(0xff));
      NBHD_RETURN_IF_ERROR(w.d_additional_values.buffer.fill_bytes(0xff));
    }
  }
  *out = std::move(w);
  return Status::Ok();
}

ForwardTensors Workload::forward_tensors() const {
  ForwardTensors t;
  t.query = q.ref;
  t.key = k.ref;
  t.value = v.ref;
  t.rpb = rpb.ref;
  t.additional_keys = additional_keys.ref;
  t.additional_values = additional_values.ref;
  t.out = out.ref;
  t.lse = lse.ref;
  return t;
}

BackwardTensors Workload::backward_tensors() const {
  BackwardTensors t;
  t.query = q.ref;
  t.key = k.ref;
  t.value = v.ref;
  t.rpb = rpb.ref;
  t.additional_keys = additional_keys.ref;
  t.additional_values = additional_values.ref;
  t.out = out.ref;
  t.lse = lse.ref;
  t.d_out = d_out.ref;
  t.d_query = d_q.ref;
  t.d_key = d_k.ref;
  t.d_value = d_v.ref;
  t.d_rpb = d_rpb.ref;
  t.d_additional_keys = d_additional_keys.ref;
  t.d_additional_values = d_additional_values.ref;
  return t;
}

Status Workload::to_host(Workload* h) const {
  const std::pair<const Tensor*, Tensor*> pairs[] = {
      {&q, &h->q},
      {&k, &h->k},
      {&v, &h->v},
      {&rpb, &h->rpb},
      {&additional_keys, &h->additional_keys},
      {&additional_values, &h->additional_values},
      {&out, &h->out},
      {&lse, &h->lse},
      {&d_out, &h->d_out},
      {&d_q, &h->d_q},
      {&d_k, &h->d_k},
      {&d_v, &h->d_v},
      {&d_rpb, &h->d_rpb},
      {&d_additional_keys, &h->d_additional_keys},
      {&d_additional_values, &h->d_additional_values},
  };
  for (const auto& [from, to] : pairs) NBHD_RETURN_IF_ERROR(from->to_host(to));
  return Status::Ok();
}

namespace {

int64_t offset_of(const TensorRef& t, int64_t i) {
  int64_t offset = 0;
  for (int d = t.ndim - 1; d >= 0; --d) {
    offset += (i % t.shape[d]) * t.stride[d];
    i /= t.shape[d];
  }
  return offset;
}

}  // namespace

double value_at(const TensorRef& t, int64_t i) { return load(t.data, t.dtype, offset_of(t, i)); }

void set_value_at(const TensorRef& t, int64_t i, double v) { store(t.data, t.dtype, offset_of(t, i), v); }

std::vector<double> values(const TensorRef& t) {
  std::vector<double> v(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[size_t(i)] = value_at(t, i);
  return v;
}

}  // namespace nbhd::bench
