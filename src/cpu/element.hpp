// SPDX-License-Identifier: Apache-2.0
// Reading and writing elements of any dtype on the host.
#pragma once

#include <cstdint>

#include "nbhd/dtype.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd::cpu {

inline double load(const void* base, DType t, int64_t offset) {
  switch (t) {
    case DType::kFloat16: return to_float(static_cast<const half_bits*>(base)[offset]);
    case DType::kBFloat16: return to_float(static_cast<const bfloat16_bits*>(base)[offset]);
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat64: return static_cast<const double*>(base)[offset];
  }
  return 0;
}

inline void store(void* base, DType t, int64_t offset, double v) {
  switch (t) {
    case DType::kFloat16: static_cast<half_bits*>(base)[offset] = to_half(float(v)); return;
    case DType::kBFloat16: static_cast<bfloat16_bits*>(base)[offset] = to_bfloat16(float(v)); return;
    case DType::kFloat32: static_cast<float*>(base)[offset] = float(v); return;
    case DType::kFloat64: static_cast<double*>(base)[offset] = v; return;
  }
}

inline double load(const TensorRef& t, int64_t offset) { return load(t.data, t.dtype, offset); }
inline void store(const TensorRef& t, int64_t offset, double v) { store(t.data, t.dtype, offset, v); }

// n elements starting at `offset`, `step` apart, converted to Acc.
template <class Acc>
void load_row(const TensorRef& t, int64_t offset, int64_t step, int64_t n, Acc* out) {
  switch (t.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = Acc(p[i * step]);
      return;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = Acc(p[i * step]);
      return;
    }
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = Acc(load(t.data, t.dtype, offset + i * step));
  }
}

template <class Acc>
void store_row(const TensorRef& t, int64_t offset, int64_t step, int64_t n, const Acc* in) {
  for (int64_t i = 0; i < n; ++i) store(t.data, t.dtype, offset + i * step, double(in[i]));
}

}  // namespace nbhd::cpu
