// SPDX-License-Identifier: Apache-2.0
// The naive backend's operations, each one kernel (two for the reductions over
// tokens), launched on a stream. Tensors are the API's TensorRefs on the device; the
// attention weights [B, X..., H, W + M] are float32 or the problem's dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nbhd/api.hpp"

namespace nbhd::cuda::naive {

//   pn       scores  out[q, h, slot] = alpha * <x[q, h], y[key(q, slot), h / G]> (+ rpb)
//   nn       rows    out[q, h] = alpha * sum over slots of w[q, h, slot] * y[key(q, slot), h / G]
//   inverse  rows    out[k, hkv] = alpha * sum over (q, slot) with key(q, slot) = k, h in hkv's group
//                    of w[q, h, slot] * x[q, h]
//   extra_grad       the same sum for the additional tokens' rows (every query holds them)
//   rpb_grad         d rpb[h, delta] = sum over q of w[q, h, slot(q, delta)]
//
// The additional tokens are slots W..W+M-1 of pn and nn.

struct PnArgs {
  TensorRef x;        // [B, X..., H, D]
  TensorRef y;        // [B, X..., Hkv, D]
  TensorRef y_extra;  // [B, M, Hkv, D], when M > 0
  TensorRef rpb;      // [H, 2k-1, ...], optional
  TensorRef out;      // [B, X..., H, W + M]
  float alpha;
  float masked;  // what slots outside a causal window hold: -inf for scores, 0 for gradients
};
Status pn(const Problem& p, const PnArgs& a, cudaStream_t stream);

struct NnArgs {
  TensorRef weights;  // [B, X..., H, W + M]
  TensorRef y;        // [B, X..., Hkv, Dy]
  TensorRef y_extra;  // [B, M, Hkv, Dy], when M > 0
  TensorRef out;      // [B, X..., H, Dy]
  float alpha;
};
Status nn(const Problem& p, const NnArgs& a, cudaStream_t stream);

struct InverseArgs {
  TensorRef weights;  // [B, X..., H, W + M]
  TensorRef x;        // [B, X..., H, Dx]
  TensorRef out;      // [B, X..., Hkv, Dx]
  float alpha;
};
Status inverse(const Problem& p, const InverseArgs& a, cudaStream_t stream);

// probs = softmax(scores) over each row's W + M slots (in place when they alias);
// lse, when defined, gets each row's log-sum-exp.
Status softmax(const Problem& p, const TensorRef& scores, const TensorRef& probs, const TensorRef& lse,
               cudaStream_t stream);
// d_scores = probs * (d_probs - sum over slots of probs * d_probs + d_lse); d_scores
// may alias d_probs; d_lse (float32, lse's layout) is optional.
Status softmax_backward(const Problem& p, const TensorRef& probs, const TensorRef& d_probs, const TensorRef& d_scores,
                        const TensorRef& d_lse, cudaStream_t stream);

// out[b, m, hkv] = alpha * sum over tokens q and heads h of hkv's group of
// weights[b, q, h, W + m] * x[b, q, h]. `scratch` holds extra_grad_scratch floats.
struct ExtraGradArgs {
  TensorRef weights;  // [B, X..., H, W + M]
  TensorRef x;        // [B, X..., H, Dx]
  TensorRef out;      // [B, M, Hkv, Dx]
  float alpha;
  float* scratch;
};
int64_t extra_grad_scratch(const Problem& p, int64_t dim);
Status extra_grad(const Problem& p, const ExtraGradArgs& a, cudaStream_t stream);

// d_rpb (float32, rpb's shape) from the score gradients; `scratch` holds
// rpb_grad_scratch floats.
int64_t rpb_grad_scratch(const Problem& p);
Status rpb_grad(const Problem& p, const TensorRef& d_scores, const TensorRef& d_rpb, float* scratch,
                cudaStream_t stream);

}  // namespace nbhd::cuda::naive
