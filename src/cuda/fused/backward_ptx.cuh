// SPDX-License-Identifier: Apache-2.0
// The two PTX wrappers the fused backward needs beyond cuda/common/ptx.cuh: an
// 8-byte cp.async (lse and delta rows) and a no-return vector float reduction (dQ).
#pragma once

#include <cstdint>

namespace nbhd::cuda::ptx {

// 8-byte global -> shared copy (.ca: copies under 16 bytes go through L1); bytes past
// `valid_bytes` (0 or 8) are zero-filled.
__device__ __forceinline__ void cp_async_8(uint32_t smem, const void* gmem, int valid_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid_bytes));
}

// dst[0] += x, dst[1] += y in global memory, no return value (one vector red on sm_90).
__device__ __forceinline__ void red_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

}  // namespace nbhd::cuda::ptx
