// SPDX-License-Identifier: Apache-2.0
// TensorRef: a non-owning view of a strided tensor (64-bit shape and strides, in
// elements). The library never allocates the tensors it is given.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "nbhd/dtype.hpp"

namespace nbhd {

inline constexpr int kMaxTensorRank = 6;  // [B, X1, X2, X3, H, D]

struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device = Device::kCPU;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxTensorRank] = {};
  int64_t stride[kMaxTensorRank] = {};

  bool defined() const { return data != nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim && i < kMaxTensorRank; ++i) n *= shape[i];
    return n;
  }

  // A tensor with the given shape and densely packed row-major strides. With more
  // than kMaxTensorRank dims only the first are stored and ndim says how many were
  // given, so that every API call refuses it by name (check_tensors).
  static TensorRef contiguous(void* data, DType dtype, Device device,
                              std::initializer_list<int64_t> shape) {
    TensorRef t;
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.ndim = int(shape.size());
    int i = 0;
    for (int64_t s : shape)
      if (i < kMaxTensorRank) t.shape[i++] = s;
    int64_t st = 1;
    for (int d = i - 1; d >= 0; --d) {
      t.stride[d] = st;
      st *= t.shape[d];
    }
    return t;
  }
};

std::string shape_string(const TensorRef& t);

}  // namespace nbhd
