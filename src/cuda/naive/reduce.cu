// SPDX-License-Identifier: Apache-2.0
// Gradients that sum over every query: the additional tokens' rows and d rpb. Two
// passes, no atomics, so the result is deterministic: each thread sums a run of
// queries into a partial (plan_split), then one thread per output adds the partials
// in order.
#include "cuda/common/check.hpp"
#include "cuda/naive/device.cuh"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/walk.hpp"

namespace nbhd::cuda::naive {
namespace {

// ---- additional tokens: out[b, m, hkv, d] = alpha * sum over q, h of w[b, q, h, W + m] * x[b, q, h, d]

struct ExtraParams {
  TokenBox box;  // the query rows summed over (weights and x are the box's tensors)
  int64_t tokens;  // of the box
  int64_t extra, kv_heads, heads_per_kv;
  int64_t dim;
  int64_t outputs;  // batch * extra * kv_heads * dim
  Split split;      // over the tokens of one batch
  int window;       // W: slot of additional token 0
  float alpha;
  In weights, x;
  float* partial;  // [splits, outputs]
  Out out;
};

template <class T, class A>
__global__ void __launch_bounds__(kBlock) extra_partial_kernel(const __grid_constant__ ExtraParams p) {
  const A* weights = static_cast<const A*>(p.weights.data);
  const T* x = static_cast<const T*>(p.x.data);
  const int64_t items = p.split.splits * p.outputs;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += int64_t(gridDim.x) * blockDim.x) {
    // i = ((((split * B + b) * M + m) * Hkv + hkv) * dim + d): threads of a warp read
    // consecutive elements of one x row.
    const int64_t s = divide(i, p.outputs);
    int64_t rest = i - s * p.outputs;
    const int64_t d = rest % p.dim;
    rest /= p.dim;
    const int64_t hk = rest % p.kv_heads;
    rest /= p.kv_heads;
    const int64_t m = rest % p.extra;
    const int64_t b = rest / p.extra;
    const int64_t first = s * p.split.per_split;
    const int64_t last = min(first + p.split.per_split, p.tokens);
    RowIndex q = decode_row(first, p.box, 1);
    float acc = 0.f;
    for (int64_t t = first; t < last; ++t, next_token(q.box_token, p.box)) {
      for (int64_t h = hk * p.heads_per_kv; h < (hk + 1) * p.heads_per_kv; ++h) {
        const float weight =
            to_float(weights[p.weights.layout.offset(b, q.box_token, h) + (p.window + m) * p.weights.layout.inner]);
        acc = fmaf(weight, to_float(x[p.x.layout.offset(b, q.box_token, h) + d * p.x.layout.inner]), acc);
      }
    }
    p.partial[i] = acc;
  }
}

template <class T>
__global__ void __launch_bounds__(kBlock) extra_finish_kernel(const __grid_constant__ ExtraParams p) {
  T* out = static_cast<T*>(p.out.data);
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < p.outputs; o += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < p.split.splits; ++s) sum += p.partial[s * p.outputs + o];
    const int64_t d = o % p.dim;
    int64_t rest = o / p.dim;
    const int64_t hk = rest % p.kv_heads;
    rest /= p.kv_heads;
    const int token[kMaxRank] = {0, 0, int(rest % p.extra)};
    const int64_t b = rest / p.extra;
    out[p.out.layout.offset(b, token, hk) + d * p.out.layout.inner] = from_float<T>(p.alpha * sum);
  }
}

Split extra_split(const Problem& p, int64_t dim) {
  return plan_split(p.query_tokens(), p.batch * p.additional_tokens * p.kv_heads * dim);
}

// ---- d rpb[h, delta] = sum over b, q of w[b, q, h, rpb_slot(q, delta)]

struct RpbParams {
  Neighborhood nb;
  TokenBox box;  // the query rows summed over (weights are the box's tensor)
  int64_t batch, tokens, heads;  // tokens of the box
  int64_t bias_size;          // prod over axes of (2k - 1), padded axes 1
  int bias_extent[kMaxRank];  // 2k - 1 per padded axis
  int64_t outputs;            // heads * bias_size
  Split split;                // over batch * tokens query tokens
  In weights;
  float* partial;  // [splits, outputs]
  float* out;
  detail::RpbLayout out_layout;
};

// delta (per padded axis) of bias index r, row-major over the padded axes.
__device__ __forceinline__ void bias_delta(const RpbParams& p, int64_t r, int* delta) {
  for (int a = kMaxRank - 1; a >= 0; --a) {
    delta[a] = int(r % p.bias_extent[a]);
    r /= p.bias_extent[a];
  }
}

template <class A>
__global__ void __launch_bounds__(kBlock) rpb_partial_kernel(const __grid_constant__ RpbParams p) {
  const A* weights = static_cast<const A*>(p.weights.data);
  const int64_t items = p.split.splits * p.outputs;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += int64_t(gridDim.x) * blockDim.x) {
    // i = (split * H + h) * bias_size + r: a warp reads nearby slots of the same rows.
    const int64_t s = divide(i, p.outputs);
    const int64_t o = i - s * p.outputs;
    const int64_t h = o / p.bias_size;
    int delta[kMaxRank];
    bias_delta(p, o - h * p.bias_size, delta);
    const int64_t first = s * p.split.per_split;
    const int64_t last = min(first + p.split.per_split, p.batch * p.tokens);
    RowIndex q = decode_row(first, p.box, 1);  // batch and token of query `first`
    float acc = 0.f;
    for (int64_t t = first; t < last; ++t) {
      const int slot = rpb_slot(p.nb, q.token, delta);
      if (slot >= 0)
        acc += to_float(weights[p.weights.layout.offset(q.batch, q.box_token, h) + slot * p.weights.layout.inner]);
      if (next_token(q.box_token, p.box)) ++q.batch;
      grid_token(p.box, q.box_token, q.token);
    }
    p.partial[i] = acc;
  }
}

__global__ void __launch_bounds__(kBlock) rpb_finish_kernel(const __grid_constant__ RpbParams p) {
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < p.outputs; o += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < p.split.splits; ++s) sum += p.partial[s * p.outputs + o];
    const int64_t h = o / p.bias_size;
    int delta[kMaxRank];
    bias_delta(p, o - h * p.bias_size, delta);
    p.out[p.out_layout.offset(h, delta)] = sum;
  }
}

Split rpb_split(const Problem& p) { return plan_split(p.batch * p.query_tokens(), p.heads * p.rpb_size()); }

}  // namespace

int64_t extra_grad_scratch(const Problem& p, int64_t dim) {
  if (p.additional_tokens == 0) return 0;
  return extra_split(p, dim).splits * p.batch * p.additional_tokens * p.kv_heads * dim;
}

Status extra_grad(const Problem& p, const ExtraGradArgs& a, cudaStream_t stream) {
  ExtraParams k{};
  k.box = query_box(p);
  k.tokens = p.query_tokens();
  k.extra = p.additional_tokens;
  k.kv_heads = p.kv_heads;
  k.heads_per_kv = p.heads_per_kv();
  k.dim = a.out.shape[a.out.ndim - 1];
  k.outputs = p.batch * p.additional_tokens * p.kv_heads * k.dim;
  k.split = extra_split(p, k.dim);
  k.window = int(p.window_size());
  k.alpha = a.alpha;
  k.weights = {a.weights.data, detail::token_layout(a.weights, p.rank)};
  k.x = {a.x.data, detail::token_layout(a.x, p.rank)};
  k.partial = a.scratch;
  k.out = {a.out.data, detail::token_layout(a.out, 1)};
  return dispatch_types(p.dtype, a.weights.dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    extra_partial_kernel<T, decltype(w)><<<blocks_for(k.split.splits * k.outputs), kBlock, 0, stream>>>(k);
    NBHD_RETURN_IF_ERROR(launch_status("naive additional-token gradient kernel (partial sums)"));
    extra_finish_kernel<T><<<blocks_for(k.outputs), kBlock, 0, stream>>>(k);
    return launch_status("naive additional-token gradient kernel (final sums)");
  });
}

int64_t rpb_grad_scratch(const Problem& p) { return rpb_split(p).splits * p.heads * p.rpb_size(); }

Status rpb_grad(const Problem& p, const TensorRef& d_scores, const TensorRef& d_rpb, float* scratch,
                cudaStream_t stream) {
  RpbParams k{};
  k.nb = p.neighborhood();
  k.box = query_box(p);
  k.batch = p.batch;
  k.tokens = p.query_tokens();
  k.heads = p.heads;
  k.bias_size = p.rpb_size();
  for (int a = 0; a < kMaxRank; ++a) k.bias_extent[a] = 2 * k.nb.axis[a].kernel - 1;
  k.outputs = p.heads * k.bias_size;
  k.split = rpb_split(p);
  k.weights = {d_scores.data, detail::token_layout(d_scores, p.rank)};
  k.partial = scratch;
  k.out = static_cast<float*>(d_rpb.data);
  k.out_layout = detail::rpb_layout(d_rpb, p.rank);
  return dispatch_types(p.dtype, d_scores.dtype, [&](auto, auto w) -> Status {
    rpb_partial_kernel<decltype(w)><<<blocks_for(k.split.splits * k.outputs), kBlock, 0, stream>>>(k);
    NBHD_RETURN_IF_ERROR(launch_status("naive rpb gradient kernel (partial sums)"));
    rpb_finish_kernel<<<blocks_for(k.outputs), kBlock, 0, stream>>>(k);
    return launch_status("naive rpb gradient kernel (final sums)");
  });
}

}  // namespace nbhd::cuda::naive
