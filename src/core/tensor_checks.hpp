// SPDX-License-Identifier: Apache-2.0
// Checks of TensorRefs against a Problem: shape, dtype, device, presence.
#pragma once

#include <string>
#include <vector>

#include "nbhd/problem.hpp"
#include "nbhd/status.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd::detail {

struct TensorRule {
  const char* name;            // argument name as the user knows it
  const TensorRef* tensor;
  std::vector<int64_t> shape;  // expected shape
  bool required = true;
  // lse, d_rpb: float32, float64 in a float64 problem (gradients keep float64 accuracy).
  bool accumulator = false;
  bool fp32_allowed = false;   // rpb may be float32 whatever the problem's dtype
};

// Shapes of the tensors of `problem`.
// Key side (key, value and their gradients): the whole grid. Query side (query, out,
// lse, d_out, d_query, attention weights): the query sub-box, Q... below.
std::vector<int64_t> token_shape(const Problem& p, int64_t heads, int64_t dim);  // [B, X..., heads, dim]
std::vector<int64_t> query_shape(const Problem& p, int64_t heads, int64_t dim);  // [B, Q..., heads, dim]
std::vector<int64_t> lse_shape(const Problem& p);                                 // [B, Q..., H]
std::vector<int64_t> rpb_shape(const Problem& p);                                 // [H, 2k-1 ...]
std::vector<int64_t> additional_shape(const Problem& p, int64_t dim);             // [B, M, Hkv, dim]
std::vector<int64_t> attn_shape(const Problem& p);                                // [B, Q..., H, W + M]

// All rules at once: each tensor present when required, of the right shape and
// dtype, all on one device. On success *device is that device.
Status check_tensors(const Problem& p, const std::vector<TensorRule>& rules, Device* device);

// Stride of the innermost dimension is 1 (what vectorised GPU loads need).
Status check_inner_contiguous(const char* backend, const std::vector<TensorRule>& rules);

}  // namespace nbhd::detail
