// SPDX-License-Identifier: Apache-2.0
// Device element types per DType, and conversions to and from float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "nbhd/dtype.hpp"
#include "nbhd/status.hpp"

namespace nbhd::cuda {

template <DType T> struct Element;
template <> struct Element<DType::kFloat16> { using type = __half; };
template <> struct Element<DType::kBFloat16> { using type = __nv_bfloat16; };
template <> struct Element<DType::kFloat32> { using type = float; };
template <> struct Element<DType::kFloat64> { using type = double; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr float kLog2e = 1.4426950408889634f;

// Calls f(Element<dtype>::type{}) with the element type of a runtime dtype
// (float16, bfloat16, float32; float64 is CPU-only).
template <class F>
Status dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: return f(float{});
    default: return unsupported(std::string("dtype ") + name(dtype) + " is not supported on CUDA (use float16, bfloat16 or float32)");
  }
}

}  // namespace nbhd::cuda
