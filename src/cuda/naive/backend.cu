// SPDX-License-Identifier: Apache-2.0
// The `naive` backend: the operations of ops.hpp, composed. Forward is PN -> softmax
// -> NN through float32 weights in a workspace of batch * tokens * heads * (window +
// additional) floats; backward recomputes the probabilities and applies the same
// operations' gradients. Memory and speed: docs/naive.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "cuda/common/kernel_image.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/device_guard.hpp"
#include "cuda/common/workspace.hpp"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/plan.hpp"
#include "dispatch/backend.hpp"

namespace nbhd::cuda::naive {
namespace {

constexpr float kInf = INFINITY;
constexpr int64_t kAlign = 256;  // bytes between workspace regions, cudaMalloc's own alignment

cudaStream_t stream_of(const Options& o) { return static_cast<cudaStream_t>(o.stream); }
int64_t align_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

Status supports(const Problem& p, detail::Pass pass) {
  // The unfused operations with a query sub-box are not defined (the reference
  // refuses them too); forward and backward walk the box's rows (walk.hpp).
  if (pass == detail::Pass::kUnfused) NBHD_RETURN_IF_ERROR(detail::refuse_query_box(p, "naive"));
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat32)
    return unsupported(std::string("dtype ") + name(p.dtype) + " is not supported on CUDA (use float16, bfloat16 or float32)");
  if (weight_slots(p) > INT_MAX)
    return unsupported("window size + additional tokens = " + std::to_string(weight_slots(p)) +
                       " exceeds 2^31 - 1 (window slots are 32-bit)");
  if (std::max(p.dim, p.value_dim()) > INT_MAX)
    return unsupported("head dim " + std::to_string(std::max(p.dim, p.value_dim())) + " exceeds 2^31 - 1");
  return check_kernel_image("naive");
}

// Attention weights [B, Q..., H, W + M] (Q the query sub-box, or the grid), float32,
// packed, at `data`.
TensorRef weights_tensor(const Problem& p, void* data) {
  TensorRef t;
  t.data = data;
  t.dtype = DType::kFloat32;
  t.device = Device::kCUDA;
  t.ndim = p.rank + 3;
  t.shape[0] = p.batch;
  for (int a = 0; a < p.rank; ++a) t.shape[1 + a] = p.padded_query_range(kMaxRank - p.rank + a).size();
  t.shape[p.rank + 1] = p.heads;
  t.shape[p.rank + 2] = weight_slots(p);
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

const char* const kWeightsPurpose =
    "the naive backend's attention weights (batch * tokens * heads * (window + additional tokens) float32 values, "
    "see docs/naive.md)";

// One allocation holding `buffers` float32 weight tensors and `scratch` floats.
Status allocate(const Problem& p, Workspace& ws, int buffers, int64_t scratch_floats) {
  int64_t bytes = 0, total = 0;
  if (!weight_bytes(p, &bytes) || __builtin_mul_overflow(align_up(bytes), int64_t(buffers), &total) ||
      __builtin_add_overflow(total, scratch_floats * 4, &total))
    return Status(StatusCode::kOutOfMemory, std::string("the workspace size overflows 64 bits: ") + kWeightsPurpose);
  return ws.allocate(std::size_t(total), buffers ? kWeightsPurpose : "the naive backend's partial sums");
}

TensorRef weights_at(const Problem& p, const Workspace& ws, int index) {
  int64_t bytes = 0;
  weight_bytes(p, &bytes);
  return weights_tensor(p, static_cast<char*>(ws.data()) + align_up(bytes) * index);
}

float* scratch_at(const Problem& p, const Workspace& ws, int buffers) {
  int64_t bytes = 0;
  if (buffers) weight_bytes(p, &bytes);
  return reinterpret_cast<float*>(static_cast<char*>(ws.data()) + align_up(bytes) * buffers);
}

float scale_of(const Problem& p) { return float(p.softmax_scale()); }

Status forward(const Problem& p, const ForwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.query.device_index));
  Workspace ws(o);
  NBHD_RETURN_IF_ERROR(allocate(p, ws, 1, 0));
  const TensorRef scores = weights_at(p, ws, 0);
  const cudaStream_t s = stream_of(o);
  NBHD_RETURN_IF_ERROR(pn(p, {t.query, t.key, t.additional_keys, t.rpb, scores, scale_of(p), -kInf}, s));
  NBHD_RETURN_IF_ERROR(softmax(p, scores, scores, t.lse, s));
  return nn(p, {scores, t.value, t.additional_values, t.out, 1.f}, s);
}

// Recomputes the probabilities rather than reading lse: the backward is the
// composition of the unfused operations' gradients.
Status backward(const Problem& p, const BackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.query.device_index));
  const bool extra = p.additional_tokens > 0;
  int64_t scratch = 0;
  if (extra) scratch = std::max(extra_grad_scratch(p, p.dim), extra_grad_scratch(p, p.value_dim()));
  if (t.d_rpb.defined()) scratch = std::max(scratch, rpb_grad_scratch(p));
  Workspace ws(o);
  NBHD_RETURN_IF_ERROR(allocate(p, ws, 2, scratch));
  const TensorRef probs = weights_at(p, ws, 0), d_scores = weights_at(p, ws, 1);
  float* partial = scratch_at(p, ws, 2);
  const cudaStream_t s = stream_of(o);
  const float scale = scale_of(p);

  NBHD_RETURN_IF_ERROR(pn(p, {t.query, t.key, t.additional_keys, t.rpb, probs, scale, -kInf}, s));
  NBHD_RETURN_IF_ERROR(softmax(p, probs, probs, TensorRef{}, s));
  // d probs (into d_scores), then d value and d additional values from probs.
  NBHD_RETURN_IF_ERROR(pn(p, {t.d_out, t.value, t.additional_values, TensorRef{}, d_scores, 1.f, 0.f}, s));
  NBHD_RETURN_IF_ERROR(inverse(p, {probs, t.d_out, t.d_value, 1.f}, s));
  if (extra && t.d_additional_values.defined())
    NBHD_RETURN_IF_ERROR(extra_grad(p, {probs, t.d_out, t.d_additional_values, 1.f, partial}, s));
  NBHD_RETURN_IF_ERROR(softmax_backward(p, probs, d_scores, d_scores, t.d_lse, s));
  // Through the scores: d query (NN), d key (IN), d additional keys, d rpb.
  NBHD_RETURN_IF_ERROR(nn(p, {d_scores, t.key, t.additional_keys, t.d_query, scale}, s));
  NBHD_RETURN_IF_ERROR(inverse(p, {d_scores, t.query, t.d_key, scale}, s));
  if (extra && t.d_additional_keys.defined())
    NBHD_RETURN_IF_ERROR(extra_grad(p, {d_scores, t.query, t.d_additional_keys, scale, partial}, s));
  if (t.d_rpb.defined()) NBHD_RETURN_IF_ERROR(rpb_grad(p, d_scores, t.d_rpb, partial, s));
  return Status::Ok();
}

// ---- the public unfused operations

Status qk_op(const Problem& p, const QkTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.query.device_index));
  return pn(p, {t.query, t.key, t.additional_keys, t.rpb, t.attn, scale_of(p), -kInf}, stream_of(o));
}

Status qk_backward_op(const Problem& p, const QkBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.query.device_index));
  const bool d_extra = p.additional_tokens > 0 && t.d_additional_keys.defined();
  int64_t scratch = 0;
  if (d_extra) scratch = extra_grad_scratch(p, p.dim);
  if (t.d_rpb.defined()) scratch = std::max(scratch, rpb_grad_scratch(p));
  Workspace ws(o);
  NBHD_RETURN_IF_ERROR(allocate(p, ws, 0, scratch));
  float* partial = scratch_at(p, ws, 0);
  const cudaStream_t s = stream_of(o);
  const float scale = scale_of(p);
  NBHD_RETURN_IF_ERROR(nn(p, {t.d_attn, t.key, t.additional_keys, t.d_query, scale}, s));
  NBHD_RETURN_IF_ERROR(inverse(p, {t.d_attn, t.query, t.d_key, scale}, s));
  if (d_extra) NBHD_RETURN_IF_ERROR(extra_grad(p, {t.d_attn, t.query, t.d_additional_keys, scale, partial}, s));
  if (t.d_rpb.defined()) NBHD_RETURN_IF_ERROR(rpb_grad(p, t.d_attn, t.d_rpb, partial, s));
  return Status::Ok();
}

Status softmax_op(const Problem& p, const SoftmaxTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.attn.device_index));
  return softmax(p, t.attn, t.probs, TensorRef{}, stream_of(o));
}

Status softmax_backward_op(const Problem& p, const SoftmaxBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.probs.device_index));
  return softmax_backward(p, t.probs, t.d_probs, t.d_attn, TensorRef{}, stream_of(o));
}

Status av_op(const Problem& p, const AvTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.probs.device_index));
  return nn(p, {t.probs, t.value, t.additional_values, t.out, 1.f}, stream_of(o));
}

Status av_backward_op(const Problem& p, const AvBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.probs.device_index));
  const bool d_extra = p.additional_tokens > 0 && t.d_additional_values.defined();
  Workspace ws(o);
  NBHD_RETURN_IF_ERROR(allocate(p, ws, 0, d_extra ? extra_grad_scratch(p, p.value_dim()) : 0));
  const cudaStream_t s = stream_of(o);
  // Everything that reads probs runs before d_probs is written, in case they alias.
  NBHD_RETURN_IF_ERROR(inverse(p, {t.probs, t.d_out, t.d_value, 1.f}, s));
  if (d_extra)
    NBHD_RETURN_IF_ERROR(extra_grad(p, {t.probs, t.d_out, t.d_additional_values, 1.f, scratch_at(p, ws, 0)}, s));
  return pn(p, {t.d_out, t.value, t.additional_values, TensorRef{}, t.d_probs, 1.f, 0.f}, s);
}

const detail::UnfusedImpl kUnfused = {qk_op, qk_backward_op, softmax_op, softmax_backward_op, av_op, av_backward_op};

}  // namespace
}  // namespace nbhd::cuda::naive

namespace nbhd::detail {

extern const BackendImpl kNaiveBackend = {Backend::kNaive,           Device::kCUDA,
                                          cuda::naive::supports,     cuda::naive::forward,
                                          cuda::naive::backward,     &cuda::naive::kUnfused,
                                          /*unfolds_short_groups=*/false, /*runs_periodic=*/true};

}  // namespace nbhd::detail
