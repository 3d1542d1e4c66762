// SPDX-License-Identifier: Apache-2.0
#include "core/tensor_checks.hpp"


namespace nbhd {

std::string shape_string(const TensorRef& t) {
  if (t.ndim < 0 || t.ndim > kMaxTensorRank) return "[" + std::to_string(t.ndim) + " dimensions]";
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

namespace detail {
namespace {

std::string vec_string(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

std::vector<int64_t> token_shape(const Problem& p, int64_t heads, int64_t dim) {
  std::vector<int64_t> s{p.batch};
  for (int a = 0; a < p.rank; ++a) s.push_back(p.extent[a]);
  s.push_back(heads);
  s.push_back(dim);
  return s;
}

std::vector<int64_t> query_shape(const Problem& p, int64_t heads, int64_t dim) {
  std::vector<int64_t> s{p.batch};
  for (int a = kMaxRank - p.rank; a < kMaxRank; ++a) s.push_back(p.padded_query_range(a).size());
  s.push_back(heads);
  s.push_back(dim);
  return s;
}

std::vector<int64_t> lse_shape(const Problem& p) {
  std::vector<int64_t> s = query_shape(p, p.heads, 1);
  s.pop_back();
  return s;
}

std::vector<int64_t> rpb_shape(const Problem& p) {
  std::vector<int64_t> s{p.heads};
  for (int a = 0; a < p.rank; ++a) s.push_back(2 * p.kernel[a] - 1);
  return s;
}

std::vector<int64_t> additional_shape(const Problem& p, int64_t dim) {
  return {p.batch, p.additional_tokens, p.kv_heads, dim};
}

std::vector<int64_t> attn_shape(const Problem& p) {
  return query_shape(p, p.heads, p.window_size() + p.additional_tokens);
}

Status check_tensors(const Problem& p, const std::vector<TensorRule>& rules, Device* device) {
  const TensorRef* first = nullptr;
  const char* first_name = "";
  for (const TensorRule& r : rules) {
    const TensorRef& t = *r.tensor;
    if (!t.defined()) {
      if (r.required) return invalid_argument(std::string(r.name) + " is required but was not given (null data pointer)");
      continue;
    }
    // Before anything reads its shape: a TensorRef holds at most kMaxTensorRank dims.
    if (t.ndim < 0 || t.ndim > kMaxTensorRank)
      return invalid_argument(std::string(r.name) + " has " + std::to_string(t.ndim) + " dimensions; a tensor has at most " +
                              std::to_string(kMaxTensorRank) + " ([B, X1, X2, X3, H, D])");
    bool same = t.ndim == int(r.shape.size());
    for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == r.shape[i];
    if (!same)
      return invalid_argument(std::string(r.name) + " has shape " + shape_string(t) + " but the problem needs " +
                              vec_string(r.shape));
    const DType accumulator = accumulator_dtype(p.dtype);
    const bool dtype_ok = r.accumulator ? t.dtype == accumulator
                                        : (t.dtype == p.dtype || (r.fp32_allowed && t.dtype == DType::kFloat32));
    if (!dtype_ok)
      return type_mismatch(std::string(r.name) + " has dtype " + name(t.dtype) + " but must be " +
                           (r.accumulator ? std::string(name(accumulator)) +
                                                (p.dtype == DType::kFloat64 ? " (the problem is float64)" : "")
                                          : std::string(name(p.dtype))) +
                           (r.fp32_allowed && !r.accumulator ? " or float32" : ""));
    for (int i = 0; i < t.ndim; ++i)
      if (t.stride[i] < 0)
        return invalid_argument(std::string(r.name) + " has a negative stride in dimension " + std::to_string(i) +
                                "; negative strides are not supported");
    if (!first) {
      first = &t;
      first_name = r.name;
    } else if (t.device != first->device || t.device_index != first->device_index) {
      return type_mismatch(std::string(r.name) + " is on " + name(t.device) + ":" + std::to_string(t.device_index) +
                           " but " + first_name + " is on " + name(first->device) + ":" +
                           std::to_string(first->device_index) + "; all tensors must be on one device");
    }
  }
  if (device) *device = first ? first->device : Device::kCPU;
  return Status::Ok();
}

Status check_inner_contiguous(const char* backend, const std::vector<TensorRule>& rules) {
  for (const TensorRule& r : rules) {
    const TensorRef& t = *r.tensor;
    if (t.defined() && t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.stride[t.ndim - 1] != 1)
      return unsupported(std::string("backend ") + backend + " needs the last dimension of " + r.name +
                         " to be contiguous (stride 1), got stride " + std::to_string(t.stride[t.ndim - 1]) +
                         "; call .contiguous() first");
  }
  return Status::Ok();
}

}  // namespace detail
}  // namespace nbhd
