// SPDX-License-Identifier: Apache-2.0
// The PTX wrappers the fused backward needs beyond cuda/common/ptx.cuh: an 8-byte
// cp.async (lse and delta rows), a no-return vector float reduction (dQ), and the
// sm_90 bulk reduce-add of a shared-memory row into global memory (the Hopper key
// pass's dQ) with its group waits.
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

// dst[0 .. bytes / 4) += the floats at shared address src, as one asynchronous bulk
// operation of this thread's bulk group (sm_90; bytes a multiple of 16, both
// addresses 16-byte aligned).
__device__ __forceinline__ void bulk_reduce_add(float* dst, uint32_t src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Until at most kPending of this thread's bulk groups have not yet read their
// shared-memory sources (so those may be written again).
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Until at most kPending of this thread's bulk groups are incomplete.
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

}  // namespace nbhd::cuda::ptx
