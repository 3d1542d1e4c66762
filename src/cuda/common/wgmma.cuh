// SPDX-License-Identifier: Apache-2.0
// Thin wrappers over the sm_90a warpgroup matrix instructions (wgmma.mma_async) the
// Hopper kernels use, and the shared-memory descriptors they read. A warpgroup is 4
// consecutive warps starting at a warp index divisible by 4; every thread of it
// issues each wgmma. Accumulator layout of m64nN (PTX ISA, "wgmma .m64nNk16 D"):
// warp w of the group owns rows 16w..16w+15, and within the warp every 8 columns
// repeat the mma.sync m16n8 C layout, so d[4j + e] is (16w + g + 8 (e / 2),
// 8j + 2t + e % 2) with g = lane / 4, t = lane % 4. An A operand in registers has
// the mma.sync m16n8k16 A layout per warp (ptx.cuh).
//
// Shared-memory tiles use the 128-byte swizzle: a tile of R rows and 64 columns of
// 16-bit elements is R x 128 bytes, the 16-byte chunk c of row r stored at chunk
// c ^ (r % 8); wider rows are several such slabs, one after another. Slabs start on
// 1024-byte boundaries (the swizzle repeats every 8 rows of 128 bytes).
//
// Compiled for sm_90a only: on other targets the wrappers trap, and the host never
// launches a kernel that uses them there (fused/backend.cu checks the device).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NBHD_WGMMA_ENABLED 1
#else
#define NBHD_WGMMA_ENABLED 0
#endif

namespace nbhd::cuda::wgmma {

// Descriptor of a 128-byte-swizzled operand starting at shared address `start`
// (PTX ISA, "Matrix Descriptor Format"): `leading` and `stride` byte offsets are
// those of the canonical layouts: K-major: stride = 1024 (next 8 rows), leading
// unused (1); MN-major: leading = the next 64-column slab, stride = 1024 (next 8
// rows of K). Base offset 0: every slab starts on a 1024-byte boundary.
__device__ __forceinline__ uint64_t descriptor(uint32_t start, uint32_t leading, uint32_t stride) {
  return uint64_t((start & 0x3ffff) >> 4) | (uint64_t((leading & 0x3ffff) >> 4) << 16) |
         (uint64_t((stride & 0x3ffff) >> 4) << 32) | (uint64_t(1) << 62);
}

// Orders this thread's earlier register writes (accumulators, A fragments) before
// the next wgmma reads them.
__device__ __forceinline__ void fence() {
#if NBHD_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit_group() {
#if NBHD_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wait_group() {
#if NBHD_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Shared memory written through the generic proxy (st.shared, cp.async) must be
// fenced before the async proxy (wgmma operands) reads it; each writing thread
// fences, then the CTA barrier orders it for everyone.
__device__ __forceinline__ void fence_proxy_async() {
#if NBHD_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving register reads or writes of `d` across the fence
// and wait instructions (asm statements are ordered among themselves; registers
// are not memory): before fence() for what the next wgmma reads, after
// wait_group() for what the last one wrote.
template <int kN>
__device__ __forceinline__ void fence_operands(float* d) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_operands(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The instructions, with their register lists written out (inline asm takes no
// arrays): d has N / 2 floats per thread; the transposes are immediates.
#define NBHD_WGMMA_D16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define NBHD_WGMMA_OUT16 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define NBHD_WGMMA_D32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NBHD_WGMMA_OUT32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define NBHD_WGMMA_D64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define NBHD_WGMMA_OUT64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define NBHD_WGMMA_SS_N32(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D16 "}, %16, %17, p, 1, 1, %19, %20;\n}\n" \
               : NBHD_WGMMA_OUT16 \
               : "l"(a_desc), "l"(b_desc), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
#define NBHD_WGMMA_RS_N32(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D16 "}, " \
               "{%16, %17, %18, %19}, %20, p, 1, 1, 1;\n}\n" \
               : NBHD_WGMMA_OUT16 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(int(accumulate)))
#define NBHD_WGMMA_SS_N64(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D32 "}, %32, %33, p, 1, 1, %35, %36;\n}\n" \
               : NBHD_WGMMA_OUT32 \
               : "l"(a_desc), "l"(b_desc), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
#define NBHD_WGMMA_RS_N64(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D32 "}, " \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
               : NBHD_WGMMA_OUT32 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(int(accumulate)))
#define NBHD_WGMMA_SS_N128(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D64 "}, %64, %65, p, 1, 1, %67, %68;\n}\n" \
               : NBHD_WGMMA_OUT64 \
               : "l"(a_desc), "l"(b_desc), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
#define NBHD_WGMMA_RS_N128(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" NBHD_WGMMA_D64 "}, " \
               "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
               : NBHD_WGMMA_OUT64 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(int(accumulate)))

// D[64 x N] = (accumulate ? D : 0) + A[64 x 16] B[16 x N], both from shared memory.
// K-major by default (A's rows are its M rows, B's rows its N columns: S = Q K^T
// reads Q and K as stored); kTransA / kTransB read that operand MN-major instead
// (its rows are the 16 k: dQ = dS K reads dS^T and K as stored).
template <class T, int kN, bool kTransA = false, bool kTransB = false>
__device__ __forceinline__ void mma_ss(float* d, uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_ss: N of 32, 64 or 128");
#if NBHD_WGMMA_ENABLED
  if constexpr (ptx::MmaName<T>::kBf16) {
    if constexpr (kN == 32) NBHD_WGMMA_SS_N32("bf16");
    else if constexpr (kN == 64) NBHD_WGMMA_SS_N64("bf16");
    else NBHD_WGMMA_SS_N128("bf16");
  } else {
    if constexpr (kN == 32) NBHD_WGMMA_SS_N32("f16");
    else if constexpr (kN == 64) NBHD_WGMMA_SS_N64("f16");
    else NBHD_WGMMA_SS_N128("f16");
  }
#else
  __trap();
#endif
}

// D[64 x N] = (accumulate ? D : 0) + A[64 x 16] B[16 x N]; A in registers, B
// MN-major in shared memory (its rows are the 16 k: O += P V reads V as stored).
template <class T, int kN>
__device__ __forceinline__ void mma_rs(float* d, const uint32_t* a, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_rs: N of 32, 64 or 128");
#if NBHD_WGMMA_ENABLED
  if constexpr (ptx::MmaName<T>::kBf16) {
    if constexpr (kN == 32) NBHD_WGMMA_RS_N32("bf16");
    else if constexpr (kN == 64) NBHD_WGMMA_RS_N64("bf16");
    else NBHD_WGMMA_RS_N128("bf16");
  } else {
    if constexpr (kN == 32) NBHD_WGMMA_RS_N32("f16");
    else if constexpr (kN == 64) NBHD_WGMMA_RS_N64("f16");
    else NBHD_WGMMA_RS_N128("f16");
  }
#else
  __trap();
#endif
}

#undef NBHD_WGMMA_SS_N32
#undef NBHD_WGMMA_RS_N32
#undef NBHD_WGMMA_SS_N64
#undef NBHD_WGMMA_RS_N64
#undef NBHD_WGMMA_SS_N128
#undef NBHD_WGMMA_RS_N128
#undef NBHD_WGMMA_D16
#undef NBHD_WGMMA_OUT16
#undef NBHD_WGMMA_D32
#undef NBHD_WGMMA_OUT32
#undef NBHD_WGMMA_D64
#undef NBHD_WGMMA_OUT64

}  // namespace nbhd::cuda::wgmma
