// SPDX-License-Identifier: Apache-2.0
// Public entry points: fused forward/backward and the unfused operations.
// Every function validates its arguments and returns a Status; none throws.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "nbhd/problem.hpp"
#include "nbhd/status.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd {

enum class Backend {
  kAuto,       // fastest built backend that can run the problem on the tensors' device
  kReference,  // CPU, plain loops, float64 accumulation: the oracle
  kCpu,        // CPU, tiled and multi-threaded
  kNaive,      // CUDA, unfused kernels (the paper's baseline)
  kFused,      // CUDA, flash-style fused kernels on tensor cores
  kGemm,       // CUDA, unfused operations as tiled matrix products on tensor cores
};

const char* name(Backend b);
// Parses "auto", "reference", "cpu", "naive", "fused", "gemm".
Status parse_backend(const std::string& text, Backend* out);

// Workspace memory for backends that need scratch space. When `allocate` is null
// the library uses malloc (CPU) or cudaMallocAsync on the stream (CUDA).
struct Allocator {
  void* (*allocate)(std::size_t bytes, void* context) = nullptr;
  void (*deallocate)(void* pointer, void* context) = nullptr;
  void* context = nullptr;
};

struct Options {
  Backend backend = Backend::kAuto;
  void* stream = nullptr;      // cudaStream_t, opaque here; null is the default stream
  bool deterministic = false;  // bitwise-reproducible gradients
  int num_threads = 0;         // CPU backends; 0 = all hardware threads
  Allocator allocator;
};

// Tensors are heads-last: q [B, Q..., H, D], k [B, X..., Hkv, D], v [B, X..., Hkv, Dv],
// out [B, Q..., H, Dv], lse [B, Q..., H] (float32), rpb [H, 2k-1 ...],
// additional_keys [B, M, Hkv, D], additional_values [B, M, Hkv, Dv]. X is the grid,
// Q the problem's query sub-box (the grid unless one is set); gradients have their
// input's shape, d_out out's.
// Optional tensors are left undefined (data == nullptr).
struct ForwardTensors {
  TensorRef query, key, value;
  TensorRef rpb, additional_keys, additional_values;
  TensorRef out;
  TensorRef lse;  // optional
};

struct BackwardTensors {
  TensorRef query, key, value;
  TensorRef rpb, additional_keys, additional_values;
  TensorRef out, lse, d_out;
  TensorRef d_query, d_key, d_value;
  TensorRef d_rpb;                                  // optional, float32, rpb's shape
  TensorRef d_additional_keys, d_additional_values; // required when additional tokens are given
  // Optional: the gradient of lse (lse's shape and dtype), when the caller's loss
  // uses lse. d lse / d score = P, so it folds into every score's gradient as
  // dS = P (dP - delta + d_lse): one more term per row, no attention weights.
  TensorRef d_lse;
};

Status forward(const Problem& problem, const ForwardTensors& tensors, const Options& options = {});
Status backward(const Problem& problem, const BackwardTensors& tensors, const Options& options = {});

// The checks forward() and backward() make before they run (the problem, every
// tensor's shape, dtype and device, the optional ones' presence), without running:
// for a framework tracing shapes with tensors that have no memory. The tensors' data
// only has to be non-null; it is not read.
Status check_forward(const Problem& problem, const ForwardTensors& tensors);
Status check_backward(const Problem& problem, const BackwardTensors& tensors);

// Unfused operations. Attention weights are laid out per query by window slot:
// attn [B, X..., H, W + M] with W = prod(kernel) slots in row-major order over the
// axes (slot offset = key index in group - window begin) and the M additional tokens
// after them. Slots outside a causal window hold -inf scores and 0 probabilities.
struct QkTensors {
  TensorRef query, key, rpb, additional_keys;  // rpb, additional_keys optional
  TensorRef attn;                              // out: scale * <q, k> + rpb
};
struct QkBackwardTensors {
  TensorRef query, key, additional_keys, d_attn;
  TensorRef d_query, d_key, d_rpb, d_additional_keys;  // d_rpb, d_additional_keys optional
};
struct SoftmaxTensors {
  TensorRef attn;   // scores in
  TensorRef probs;  // probabilities out (may alias attn)
};
struct SoftmaxBackwardTensors {
  TensorRef probs, d_probs;
  TensorRef d_attn;  // may alias d_probs
};
struct AvTensors {
  TensorRef probs, value, additional_values;  // additional_values optional
  TensorRef out;
};
struct AvBackwardTensors {
  TensorRef probs, value, additional_values, d_out;
  TensorRef d_probs, d_value, d_additional_values;  // d_additional_values optional
};

Status qk(const Problem&, const QkTensors&, const Options& = {});
Status qk_backward(const Problem&, const QkBackwardTensors&, const Options& = {});
Status softmax(const Problem&, const SoftmaxTensors&, const Options& = {});
Status softmax_backward(const Problem&, const SoftmaxBackwardTensors&, const Options& = {});
Status av(const Problem&, const AvTensors&, const Options& = {});
Status av_backward(const Problem&, const AvBackwardTensors&, const Options& = {});

// Backends compiled into this build, with the device each runs on.
struct BackendInfo {
  Backend backend;
  Device device;
  bool fused_ops;    // implements forward/backward
  bool unfused_ops;  // implements qk / softmax / av
  bool unfolds_short_groups;  // runs short dilation groups as an extra axis (docs/design.md)
};
std::vector<BackendInfo> built_backends();

// Whether `backend` can run `problem`'s forward (with `backward`, its backward) on
// `device`; the reason when it cannot.
Status can_run(Backend backend, const Problem& problem, Device device, bool backward = false);

}  // namespace nbhd
