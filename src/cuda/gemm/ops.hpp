// SPDX-License-Identifier: Apache-2.0
// The gemm backend's operations, each one kernel launched on a stream (ops.cu turns
// TensorRefs into kernel parameters). Attention weights [B, X..., H, W + M] are
// float32 (the forward/backward workspace, rows padded to kRowAlign slots) or the
// problem's dtype (the public unfused operations, any strides).
//
//   pn  w[q, h, slot] = alpha * <x[q, h], y[key(q, slot), h / G]> (+ rpb), then an epilogue
//   nn  out[q, h] = alpha * sum over slots of w[q, h, slot] * y[key(q, slot), h / G]
//   in  out[k, hkv] = alpha * sum over (q, h) whose window holds k of w[q, h, slot(q, k)] * x[q, h]
#pragma once

#include <cuda_runtime.h>

#include "cuda/gemm/params.hpp"
#include "cuda/gemm/plan.hpp"
#include "nbhd/api.hpp"

namespace nbhd::cuda::gemm {

// The current device's shared-memory limits and whether it runs the kernels
// (compute capability 8.0: mma.sync for bf16 and tf32, cp.async).
Status device_limits(SmemLimits* limits);

struct PnArgs {
  TensorRef x;        // [B, X..., H, D]
  TensorRef y;        // [B, X..., Hkv, D]
  TensorRef y_extra;  // [B, M, Hkv, D], when M > 0
  TensorRef rpb;      // optional
  TensorRef out;      // weights
  float alpha;
  float masked;  // slots a causal window does not reach: -inf for scores, 0 for gradients
  Epilogue epilogue = Epilogue::kStore;
  TensorRef probs;           // kSoftmaxBackward: probabilities, out's layout and dtype
  TensorRef lse;             // kSoftmax: optional
  int64_t out_capacity = 0;  // writable slots per out row; 0: W + M (the workspace passes its padded rows)
};
// `*epilogue_done`: whether the epilogue ran (it needs whole rows in shared memory);
// when it did not, the caller applies it (naive::softmax / softmax_backward).
Status pn(const Problem& p, const Plan& plan, const PnArgs& a, cudaStream_t stream, bool* epilogue_done);

struct NnArgs {
  TensorRef weights;
  int64_t weight_capacity;  // readable slots per weight row: W + M, or the workspace's padded row
  TensorRef y;              // [B, X..., Hkv, Dy]
  TensorRef y_extra;        // [B, M, Hkv, Dy], when M > 0
  TensorRef out;            // [B, X..., H, Dy]
  float alpha;
};
Status nn(const Problem& p, const Plan& plan, const NnArgs& a, cudaStream_t stream);

struct InArgs {
  TensorRef weights;
  TensorRef x;    // [B, X..., H, Dx]
  TensorRef out;  // [B, X..., Hkv, Dx]
  float alpha;
};
Status in(const Problem& p, const Plan& plan, const InArgs& a, cudaStream_t stream);

// The slabs PN cuts rows into for a dot-product length `dim` and weights of dtype
// `weights` on the current device (whole rows: the epilogue runs in PN).
Status pn_slab_plan(const Problem& p, int dim, DType weights, SlabPlan* plan);

// Why the gemm kernels cannot run `p` (dtype not built, head dim, 32-bit slot codes), or Ok.
Status check_problem(const Problem& p);

// Whether the planned kernels' grids fit CUDA's launch limits (tile_shape.hpp).
Status check_grids(const Problem& p, const Plan& plan);

}  // namespace nbhd::cuda::gemm
