// SPDX-License-Identifier: Apache-2.0
// The `gemm` backend: neighborhood attention as tiled matrix products on tensor
// cores (PN, NN, IN in ops.hpp), composed like the naive backend's kernels. Forward
// is scores (PN, softmax fused in when a row fits in shared memory) -> out (NN)
// through attention weights in a workspace whose rows are padded to 8 slots (16
// bytes or more); backward recomputes the probabilities and applies the operations'
// gradients. The
// softmax over rows too long for shared memory, and the sums over every query (d rpb,
// the additional tokens' gradients), run on the naive backend's kernels. Design,
// memory and what to measure: docs/gemm.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/common/check.hpp"
#include "cuda/common/device_guard.hpp"
#include "cuda/common/workspace.hpp"
#include "cuda/gemm/ops.hpp"
#include "cuda/naive/ops.hpp"
#include "dispatch/backend.hpp"

namespace nbhd::cuda::gemm {
namespace {

constexpr float kInf = INFINITY;
constexpr int64_t kAlign = 256;  // bytes between workspace regions

cudaStream_t stream_of(const Options& o) { return static_cast<cudaStream_t>(o.stream); }
int64_t align_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
float scale_of(const Problem& p) { return float(p.softmax_scale()); }

Status supports(const Problem& p, detail::Pass) {
  NBHD_RETURN_IF_ERROR(detail::refuse_query_box(p, "gemm"));
  NBHD_RETURN_IF_ERROR(check_problem(p));
  // The grids follow the plan, which reads the device; without a readable one the
  // call reports that instead.
  SmemLimits limits;
  if (!device_limits(&limits).ok()) {
    cudaGetLastError();  // clear the error of a machine without a GPU
    return Status::Ok();
  }
  return check_grids(p, make_plan(p, limits));
}

// Attention weights [B, X..., H, W + M] of `dtype`, rows padded_slots(p) apart, at `data`.
TensorRef weights_tensor(const Problem& p, void* data, DType dtype) {
  TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.device = Device::kCUDA;
  t.ndim = p.rank + 3;
  t.shape[0] = p.batch;
  for (int a = 0; a < p.rank; ++a) t.shape[1 + a] = p.extent[a];
  t.shape[p.rank + 1] = p.heads;
  t.shape[p.rank + 2] = p.window_size() + p.additional_tokens;
  t.stride[t.ndim - 1] = 1;
  int64_t stride = padded_slots(p);
  for (int d = t.ndim - 2; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

// Bytes of one weight tensor; false when the count overflows 64 bits.
bool weight_bytes(const Problem& p, DType dtype, int64_t* bytes) {
  int64_t n = 0;
  return !__builtin_mul_overflow(p.batch * p.tokens() * p.heads, padded_slots(p), &n) &&
         !__builtin_mul_overflow(n, int64_t(size_of(dtype)), bytes);
}

const char* const kWeightsPurpose =
    "the gemm backend's attention weights (batch * tokens * heads * (window + additional tokens, rounded up to 8) "
    "values, see docs/gemm.md)";

// One allocation: `buffers` weight tensors of `dtype`, then `scratch_floats` floats.
class Weights {
 public:
  Weights(const Options& o, const Problem& p, DType dtype) : ws_(o), p_(p), dtype_(dtype) {}

  Status allocate(int buffers, int64_t scratch_floats) {
    int64_t total = 0;
    if ((buffers && !weight_bytes(p_, dtype_, &bytes_)) ||
        __builtin_mul_overflow(align_up(bytes_), int64_t(buffers), &total) ||
        __builtin_add_overflow(total, scratch_floats * 4, &total))
      return Status(StatusCode::kOutOfMemory, std::string("the workspace size overflows 64 bits: ") + kWeightsPurpose);
    buffers_ = buffers;
    return ws_.allocate(std::size_t(total), buffers ? kWeightsPurpose : "the gemm backend's partial sums");
  }
  TensorRef at(int index) const {
    return weights_tensor(p_, static_cast<char*>(ws_.data()) + align_up(bytes_) * index, dtype_);
  }
  float* scratch() const {
    return reinterpret_cast<float*>(static_cast<char*>(ws_.data()) + align_up(bytes_) * buffers_);
  }

 private:
  Workspace ws_;
  const Problem& p_;
  DType dtype_;
  int64_t bytes_ = 0;
  int buffers_ = 0;
};

// Everything a call needs before its kernels: the device, the problem's support, the plan.
Status prepare(const Problem& p, int device_index, DeviceGuard& guard, Plan* plan) {
  NBHD_RETURN_IF_ERROR(guard.set(device_index));
  NBHD_RETURN_IF_ERROR(check_problem(p));
  SmemLimits limits;
  NBHD_RETURN_IF_ERROR(device_limits(&limits));
  *plan = make_plan(p, limits);
  return Status::Ok();
}

// probs = softmax(scores) of the workspace rows, in place: fused into PN when a row
// fits in shared memory, else the naive backend's row kernel (which also writes lse).
Status probabilities(const Problem& p, const Plan& plan, const TensorRef& q, const TensorRef& k, const TensorRef& ak,
                     const TensorRef& rpb, const TensorRef& weights, const TensorRef& lse, cudaStream_t s) {
  PnArgs a{q, k, ak, rpb, weights, scale_of(p), -kInf, Epilogue::kSoftmax, TensorRef{}, lse};
  a.out_capacity = padded_slots(p);
  bool done = false;
  NBHD_RETURN_IF_ERROR(pn(p, plan, a, s, &done));
  if (!done) NBHD_RETURN_IF_ERROR(naive::softmax(p, weights, weights, lse, s));
  return Status::Ok();
}

Status forward(const Problem& p, const ForwardTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.query.device_index, guard, &plan));
  // When PN's epilogue turns whole rows into probabilities, a 16-bit problem keeps
  // them in its dtype: NN rounds them to it for the tensor cores anyway, so the
  // result is the same with half the bytes. Rows that go through several slabs hold
  // scores for the naive softmax, in float32.
  DType weights = DType::kFloat32;
  if (p.dtype != DType::kFloat32) {
    SlabPlan slabs;
    NBHD_RETURN_IF_ERROR(pn_slab_plan(p, int(p.dim), p.dtype, &slabs));
    if (slabs.whole_row()) weights = p.dtype;
  }
  Weights ws(o, p, weights);
  NBHD_RETURN_IF_ERROR(ws.allocate(1, 0));
  const TensorRef probs = ws.at(0);
  const cudaStream_t s = stream_of(o);
  NBHD_RETURN_IF_ERROR(probabilities(p, plan, t.query, t.key, t.additional_keys, t.rpb, probs, t.lse, s));
  return nn(p, plan, {probs, padded_slots(p), t.value, t.additional_values, t.out, 1.f}, s);
}

// Recomputes the probabilities rather than reading lse (as the naive backend does):
// the backward is the composition of the operations' gradients. The weights stay
// float32: the softmax backward reads probabilities and IN gathers them 4 bytes at a
// time with cp.async (docs/gemm.md).
Status backward(const Problem& p, const BackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.query.device_index, guard, &plan));
  const bool extra = p.additional_tokens > 0;
  int64_t scratch = 0;
  if (extra) scratch = std::max(naive::extra_grad_scratch(p, p.dim), naive::extra_grad_scratch(p, p.value_dim()));
  if (t.d_rpb.defined()) scratch = std::max(scratch, naive::rpb_grad_scratch(p));
  Weights ws(o, p, DType::kFloat32);
  NBHD_RETURN_IF_ERROR(ws.allocate(2, scratch));
  const TensorRef probs = ws.at(0), d_scores = ws.at(1);
  float* partial = ws.scratch();
  const cudaStream_t s = stream_of(o);
  const float scale = scale_of(p);
  const int64_t capacity = padded_slots(p);

  NBHD_RETURN_IF_ERROR(probabilities(p, plan, t.query, t.key, t.additional_keys, t.rpb, probs, TensorRef{}, s));
  // d probs = <d out, v> per slot, turned into d scores in PN's epilogue when rows fit.
  {
    PnArgs a{t.d_out, t.value, t.additional_values, TensorRef{}, d_scores, 1.f, 0.f};
    // lse's gradient (BackwardTensors::d_lse) joins in the naive row pass instead.
    const bool softmax_in_pn = !t.d_lse.defined();
    a.epilogue = softmax_in_pn ? Epilogue::kSoftmaxBackward : Epilogue::kStore;
    a.probs = probs;
    a.out_capacity = capacity;
    bool done = false;
    NBHD_RETURN_IF_ERROR(pn(p, plan, a, s, &done));
    // d value and d additional values read probs only.
    NBHD_RETURN_IF_ERROR(in(p, plan, {probs, t.d_out, t.d_value, 1.f}, s));
    if (extra && t.d_additional_values.defined())
      NBHD_RETURN_IF_ERROR(naive::extra_grad(p, {probs, t.d_out, t.d_additional_values, 1.f, partial}, s));
    if (!softmax_in_pn || !done)
      NBHD_RETURN_IF_ERROR(naive::softmax_backward(p, probs, d_scores, d_scores, t.d_lse, s));
  }
  // Through the scores: d query (NN), d key (IN), d additional keys, d rpb.
  NBHD_RETURN_IF_ERROR(nn(p, plan, {d_scores, capacity, t.key, t.additional_keys, t.d_query, scale}, s));
  NBHD_RETURN_IF_ERROR(in(p, plan, {d_scores, t.query, t.d_key, scale}, s));
  if (extra && t.d_additional_keys.defined())
    NBHD_RETURN_IF_ERROR(naive::extra_grad(p, {d_scores, t.query, t.d_additional_keys, scale, partial}, s));
  if (t.d_rpb.defined()) NBHD_RETURN_IF_ERROR(naive::rpb_grad(p, d_scores, t.d_rpb, partial, s));
  return Status::Ok();
}

// ---- the public unfused operations, on the caller's [B, X..., H, W + M] weights

int64_t public_capacity(const Problem& p) { return p.window_size() + p.additional_tokens; }

Status qk_op(const Problem& p, const QkTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.query.device_index, guard, &plan));
  bool done = false;
  return pn(p, plan, {t.query, t.key, t.additional_keys, t.rpb, t.attn, scale_of(p), -kInf}, stream_of(o), &done);
}

Status qk_backward_op(const Problem& p, const QkBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.query.device_index, guard, &plan));
  const bool d_extra = p.additional_tokens > 0 && t.d_additional_keys.defined();
  int64_t scratch = 0;
  if (d_extra) scratch = naive::extra_grad_scratch(p, p.dim);
  if (t.d_rpb.defined()) scratch = std::max(scratch, naive::rpb_grad_scratch(p));
  Weights ws(o, p, DType::kFloat32);
  NBHD_RETURN_IF_ERROR(ws.allocate(0, scratch));
  float* partial = ws.scratch();
  const cudaStream_t s = stream_of(o);
  const float scale = scale_of(p);
  NBHD_RETURN_IF_ERROR(nn(p, plan, {t.d_attn, public_capacity(p), t.key, t.additional_keys, t.d_query, scale}, s));
  NBHD_RETURN_IF_ERROR(in(p, plan, {t.d_attn, t.query, t.d_key, scale}, s));
  if (d_extra) NBHD_RETURN_IF_ERROR(naive::extra_grad(p, {t.d_attn, t.query, t.d_additional_keys, scale, partial}, s));
  if (t.d_rpb.defined()) NBHD_RETURN_IF_ERROR(naive::rpb_grad(p, t.d_attn, t.d_rpb, partial, s));
  return Status::Ok();
}

Status softmax_op(const Problem& p, const SoftmaxTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.attn.device_index));
  NBHD_RETURN_IF_ERROR(check_problem(p));
  return naive::softmax(p, t.attn, t.probs, TensorRef{}, stream_of(o));
}

Status softmax_backward_op(const Problem& p, const SoftmaxBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  NBHD_RETURN_IF_ERROR(guard.set(t.probs.device_index));
  NBHD_RETURN_IF_ERROR(check_problem(p));
  return naive::softmax_backward(p, t.probs, t.d_probs, t.d_attn, TensorRef{}, stream_of(o));
}

Status av_op(const Problem& p, const AvTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.probs.device_index, guard, &plan));
  return nn(p, plan, {t.probs, public_capacity(p), t.value, t.additional_values, t.out, 1.f}, stream_of(o));
}

Status av_backward_op(const Problem& p, const AvBackwardTensors& t, const Options& o) {
  DeviceGuard guard;
  Plan plan;
  NBHD_RETURN_IF_ERROR(prepare(p, t.probs.device_index, guard, &plan));
  const bool d_extra = p.additional_tokens > 0 && t.d_additional_values.defined();
  Weights ws(o, p, DType::kFloat32);
  NBHD_RETURN_IF_ERROR(ws.allocate(0, d_extra ? naive::extra_grad_scratch(p, p.value_dim()) : 0));
  const cudaStream_t s = stream_of(o);
  // Everything that reads probs runs before d_probs is written, in case they alias.
  NBHD_RETURN_IF_ERROR(in(p, plan, {t.probs, t.d_out, t.d_value, 1.f}, s));
  if (d_extra)
    NBHD_RETURN_IF_ERROR(naive::extra_grad(p, {t.probs, t.d_out, t.d_additional_values, 1.f, ws.scratch()}, s));
  bool done = false;
  return pn(p, plan, {t.d_out, t.value, t.additional_values, TensorRef{}, t.d_probs, 1.f, 0.f}, s, &done);
}

const detail::UnfusedImpl kUnfused = {qk_op, qk_backward_op, softmax_op, softmax_backward_op, av_op, av_backward_op};

}  // namespace
}  // namespace nbhd::cuda::gemm

namespace nbhd::detail {

extern const BackendImpl kGemmBackend = {Backend::kGemm,      Device::kCUDA,        cuda::gemm::supports,
                                         cuda::gemm::forward, cuda::gemm::backward, &cuda::gemm::kUnfused,
                                         /*unfolds_short_groups=*/true, /*runs_periodic=*/true};

}  // namespace nbhd::detail
