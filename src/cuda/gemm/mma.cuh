// SPDX-License-Identifier: Apache-2.0
// Warp-level matrix products of the gemm kernels, one interface per element type:
//   float16 / bfloat16: mma.sync m16n8k16, fp32 accumulation (common/ptx.cuh);
//   float32: three tf32 mma.sync m16n8k8 per product (a_hi b_hi + a_hi b_lo + a_lo b_hi,
//            x = hi + lo with hi = tf32(x), lo = tf32(x - hi)), which keeps float32
//            accuracy (~2^-21 relative per product) at a third of the tf32 rate.
// Fragment layouts (PTX ISA), g = lane / 4, t = lane % 4:
//   16-bit A 16x16: a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..)
//   tf32   A 16x8:  a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4)
//   16-bit B 16x8:  b0 (k 2t..2t+1, n g) b1 (k 2t+8.., n g);  tf32 B 8x8: b0 (k t, n g) b1 (k t+4, n g)
//   C 16x8 (both):  c0 c1 (g, 2t..2t+1) c2 c3 (g+8, 2t..2t+1)
// ldmatrix moves 16-byte rows whatever the element type, so the same lane addresses
// load 16-bit and tf32 A fragments from row-major [m][k] tiles and B fragments from
// [n][k] tiles (a 16-byte row is 8 halves or 4 floats: exactly a fragment's k-run).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"

namespace nbhd::cuda::gemm {

// 4-byte global -> shared copy; zero-filled when valid_bytes is 0.
__device__ __forceinline__ void cp_async_4(uint32_t smem, const void* gmem, int valid_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid_bytes));
}

// Element offsets of this lane's ldmatrix row address inside a tile of row stride
// `stride` (elements), for `vec` elements per 16 bytes.
//   A from [m][k]: rows (lane % 8) + 8 * ((lane / 8) % 2), k + vec * (lane / 16)
//   B from [n][k]: rows (lane % 8) + 8 * (lane / 16),     k + vec * ((lane / 8) % 2)
//   B from [k][n], transposed (16-bit only): rows k (lane % 8) + 8 * ((lane / 8) % 2), n + 8 * (lane / 16)
__device__ __forceinline__ int lane_offset_a(int lane, int stride, int vec) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * stride + (lane >> 4) * vec;
}
__device__ __forceinline__ int lane_offset_b_nk(int lane, int stride, int vec) {
  return ((lane & 7) + (lane >> 4) * 8) * stride + ((lane >> 3) & 1) * vec;
}
__device__ __forceinline__ int lane_offset_b_kn(int lane, int stride) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * stride + (lane >> 4) * 8;
}

template <class T>
struct Mma16 {
  static constexpr int kK = 16;
  struct A {
    uint32_t r[4];
  };
  struct B {
    uint32_t r[2];
  };

  // 16 x kK A fragment at a lane address from lane_offset_a.
  __device__ static A load_a(uint32_t address) {
    A a;
    ptx::ldmatrix_x4(a.r, address);
    return a;
  }
  // Two n8 B fragments (n 0-7, 8-15) at a lane address from lane_offset_b_nk.
  __device__ static void load_b_nk(uint32_t address, B& b0, B& b1) {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, address);
    b0 = {{r[0], r[1]}};
    b1 = {{r[2], r[3]}};
  }
  // Two n8 B fragments from a [k][n] tile: rows k0.., columns n0.. and n0 + 8..
  __device__ static void load_b_kn(const T* tile, int stride, int k0, int n0, int lane_kn, B& b0, B& b1) {
    uint32_t r[4];
    ptx::ldmatrix_x4_trans(r, ptx::smem_address(tile + k0 * stride + n0 + lane_kn));
    b0 = {{r[0], r[1]}};
    b1 = {{r[2], r[3]}};
  }
  // An A fragment from values: f(row half 0/1 (rows g / g + 8), column 0..kK-1).
  template <class F>
  __device__ static A make_a(int lane, F&& f) {
    const int t = lane & 3;
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rs = i & 1, c = 2 * t + 8 * (i >> 1);
      a.r[i] = ptx::pack2<T>(f(rs, c), f(rs, c + 1));
    }
    return a;
  }
  __device__ static void mma(float* c, const A& a, const B& b) { ptx::mma_16816<T>(c, a.r, b.r); }
  __device__ static void mma_if(bool on, float* c, const A& a, const B& b) { ptx::mma_16816_if<T>(on, c, a.r, b.r); }
};

struct MmaTf32x3 {
  static constexpr int kK = 8;
  struct A {
    uint32_t hi[4], lo[4];
  };
  struct B {
    uint32_t hi[2], lo[2];
  };

  __device__ static uint32_t to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
  }
  __device__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
  }
  __device__ static void split(uint32_t bits, uint32_t& hi, uint32_t& lo) { split(__uint_as_float(bits), hi, lo); }

  __device__ static A load_a(uint32_t address) {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, address);
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) split(r[i], a.hi[i], a.lo[i]);
    return a;
  }
  __device__ static void load_b_nk(uint32_t address, B& b0, B& b1) {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, address);
    split(r[0], b0.hi[0], b0.lo[0]);
    split(r[1], b0.hi[1], b0.lo[1]);
    split(r[2], b1.hi[0], b1.lo[0]);
    split(r[3], b1.hi[1], b1.lo[1]);
  }
  // b0 = (k t, n g), b1 = (k t + 4, n g): one float per lane down a column; with a
  // row stride of 8 (mod 32) floats the 32 lanes hit 32 banks. `lane_kn` = t * stride + g.
  __device__ static void load_b_kn(const float* tile, int stride, int k0, int n0, int lane_kn, B& b0, B& b1) {
    const float* p = tile + k0 * stride + n0 + lane_kn;
    split(p[0], b0.hi[0], b0.lo[0]);
    split(p[4 * stride], b0.hi[1], b0.lo[1]);
    split(p[8], b1.hi[0], b1.lo[0]);
    split(p[4 * stride + 8], b1.hi[1], b1.lo[1]);
  }
  template <class F>
  __device__ static A make_a(int lane, F&& f) {
    const int t = lane & 3;
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) split(float(f(i & 1, t + 4 * (i >> 1))), a.hi[i], a.lo[i]);
    return a;
  }

  __device__ static void mma1(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ static void mma1_if(bool on, float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "@p mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(int(on)));
  }
  // Small terms first: they are added to the running sum before the large one.
  __device__ static void mma(float* c, const A& a, const B& b) {
    mma1(c, a.lo, b.hi);
    mma1(c, a.hi, b.lo);
    mma1(c, a.hi, b.hi);
  }
  __device__ static void mma_if(bool on, float* c, const A& a, const B& b) {
    mma1_if(on, c, a.lo, b.hi);
    mma1_if(on, c, a.hi, b.lo);
    mma1_if(on, c, a.hi, b.hi);
  }
};

template <class T>
struct MmaFor;
template <>
struct MmaFor<__half> {
  using type = Mma16<__half>;
};
template <>
struct MmaFor<__nv_bfloat16> {
  using type = Mma16<__nv_bfloat16>;
};
template <>
struct MmaFor<float> {
  using type = MmaTf32x3;
};
template <class T>
using Mma = typename MmaFor<T>::type;

// This lane's offset for load_b_kn: 16-bit tiles go through ldmatrix.trans, float32
// tiles are read one element per lane.
template <class T>
__device__ __forceinline__ int lane_offset_kn(int lane, int stride) {
  if constexpr (sizeof(T) == 4)
    return (lane & 3) * stride + (lane >> 2);
  else
    return lane_offset_b_kn(lane, stride);
}

}  // namespace nbhd::cuda::gemm
