// SPDX-License-Identifier: Apache-2.0
// Device helpers of the naive kernels: chunks of kChunk elements loaded or stored as
// floats (16-byte vectors where the host allowed it), reductions over the lanes that
// share a row, and the warp-uniform row loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "core/layout.hpp"
#include "cuda/common/numeric.cuh"
#include "cuda/naive/plan.hpp"

namespace nbhd::cuda::naive {

// A strided tensor as the kernels see it: base pointer and element offsets.
struct In {
  const void* data;
  detail::TokenLayout layout;
};
struct Out {
  void* data;
  detail::TokenLayout layout;
};

// Lanes sharing one row: `lanes` (a power of two <= 32) consecutive lanes of a warp.
struct LaneGroup {
  int lanes;
  int shift;  // log2(lanes)
};

// Elements [c * kChunk, c * kChunk + n) of a row, n <= kChunk, as floats (0 past n).
// `vectorized`: the host checked rows_vectorizable, so n == kChunk and the chunk sits
// on 16 bytes with unit stride.
// A 16-bit element from its bits and back, in registers (a union or a pointer cast
// would send the 16-byte vector through local memory: 40 bytes of stack per thread).
template <class T> __device__ __forceinline__ T from_bits(unsigned short b);
template <> __device__ __forceinline__ __half from_bits<__half>(unsigned short b) { return __ushort_as_half(b); }
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short b) {
  return __ushort_as_bfloat16(b);
}
__device__ __forceinline__ unsigned short to_bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short to_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Elements [c * kChunk, c * kChunk + n) of a row, n <= kChunk, as floats (0 past n).
// `vectorized`: the host checked rows_vectorizable, so n == kChunk and the chunk sits
// on 16 bytes with unit stride.
template <class T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t inner, int c, int n, bool vectorized,
                                           float (&v)[kChunk]) {
  const T* p = row + int64_t(c) * kChunk * inner;
  if (vectorized) {
    if constexpr (std::is_same_v<T, float>) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = to_float(from_bits<T>((unsigned short)(words[i] & 0xffffu)));
        v[2 * i + 1] = to_float(from_bits<T>((unsigned short)(words[i] >> 16)));
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i) v[i] = i < n ? to_float(p[i * inner]) : 0.f;
}

template <class T>
__device__ __forceinline__ void store_chunk(T* row, int64_t inner, int c, int n, bool vectorized,
                                            const float (&v)[kChunk]) {
  T* p = row + int64_t(c) * kChunk * inner;
  if (vectorized) {
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      unsigned words[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        words[i] = unsigned(to_bits(from_float<T>(v[2 * i]))) | (unsigned(to_bits(from_float<T>(v[2 * i + 1]))) << 16);
      *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    if (i < n) p[i * inner] = from_float<T>(v[i]);
}

// Elements in chunk c of a row of `dim` elements.
__device__ __forceinline__ int chunk_size(int c, int dim) { return min(kChunk, dim - c * kChunk); }

// Sum and max over the lanes of a group; every lane of the warp must call them, and
// every lane gets the group's result.
__device__ __forceinline__ float group_sum(float x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ __forceinline__ float group_max(float x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Calls f(row, sub, active) for rows [0, rows), `g.lanes` lanes per row (sub = lane
// in the group). The trip count is the same for all lanes of a warp, so f may use the
// group reductions; lanes past the last row come with active == false and row clamped
// to the last row, and must not write.
template <class F>
__device__ __forceinline__ void for_each_row_uniform(int64_t rows, LaneGroup g, F&& f) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows << g.shift;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < total; base += stride) {
    const int64_t i = base + lane;
    const bool active = i < total;
    f(active ? i >> g.shift : rows - 1, lane & (g.lanes - 1), active);
  }
}

// Calls f(row, sub) for rows [0, rows), `g.lanes` lanes per row; no reductions.
template <class F>
__device__ __forceinline__ void for_each_row(int64_t rows, LaneGroup g, F&& f) {
  const int64_t total = rows << g.shift;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    f(i >> g.shift, int(i & (g.lanes - 1)));
}

// An rpb element as float: rpb is float32 or the problem's dtype T.
template <class T>
__device__ __forceinline__ float load_bias(const void* rpb, bool float32, int64_t offset) {
  return float32 ? static_cast<const float*>(rpb)[offset] : to_float(static_cast<const T*>(rpb)[offset]);
}

// Calls f(T{}, A{}) with the problem's element type T and the attention weights'
// element type A: float32 (the forward and backward workspaces) or T (the public
// unfused operations).
template <class F>
Status dispatch_types(DType problem, DType weights, F&& f) {
  return dispatch_dtype(problem, [&](auto t) -> Status {
    if (weights == DType::kFloat32) return f(t, float{});
    if (weights == problem) return f(t, t);
    return type_mismatch(std::string("attention weights of dtype ") + name(weights) + " in a " + name(problem) +
                         " problem (they must be float32 or the problem's dtype)");
  });
}

}  // namespace nbhd::cuda::naive
