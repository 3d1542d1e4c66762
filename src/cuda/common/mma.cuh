// SPDX-License-Identifier: Apache-2.0
// Warp-level matrix products of the mma.sync kernels (gemm, and fused in float32),
// one interface per element type:
//   float16 / bfloat16: mma.sync m16n8k16, fp32 accumulation (ptx.cuh);
//   float32: three tf32 mma.sync m16n8k8 per product (a_hi b_hi + a_hi b_lo + a_lo b_hi,
//            x = hi + lo with hi = tf32(x), lo = tf32(x - hi)), which keeps float32
//            accuracy (~2^-21 relative per product) at a third of the tf32 rate.
// Fragment layouts: ptx.cuh. ldmatrix moves 16-byte rows whatever the element type,
// so the same lane addresses load 16-bit and tf32 A fragments from row-major [m][k]
// tiles and B fragments from [n][k] tiles (a 16-byte row is 8 halves or 4 floats:
// exactly a fragment's k-run).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"

namespace nbhd::cuda {

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
  // One instruction per product: nothing to promote (see MmaTf32x3).
  __device__ static void mma_promoted_if(bool on, float* c, const A& a, const B& b) { mma_if(on, c, a, b); }
};

struct MmaTf32x3 {
  static constexpr int kK = 8;
  struct A {
    uint32_t hi[4], lo[4];
  };
  struct B {
    uint32_t hi[2], lo[2];
  };

  __device__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = ptx::to_tf32(x);
    lo = ptx::to_tf32(x - __uint_as_float(hi));
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
  // The A fragment of one k-step from an m16n8 accumulator block c (this lane's rows
  // g, g + 8 at columns 2t, 2t + 1), its k columns reordered: A column t is the
  // block's column 2t, A column t + 4 its column 2t + 1. The B operand must take its
  // k rows in that order (make_b_paired). (16-bit fragments need no reordering: two
  // accumulator blocks are a k16 A fragment as they are.)
  __device__ static A a_from_accumulators(const float* c) {
    A a;
    split(c[0], a.hi[0], a.lo[0]);
    split(c[2], a.hi[1], a.lo[1]);
    split(c[1], a.hi[2], a.lo[2]);
    split(c[3], a.hi[3], a.lo[3]);
    return a;
  }
  // A B fragment from values at(k, n) of a k8 x n8 block: b0 = (t, g), b1 = (t + 4, g);
  // make_b_paired takes rows 2t and 2t + 1 instead (a_from_accumulators' order).
  template <class At>
  __device__ static B make_b(int lane, At&& at) {
    const int t = lane & 3, g = lane >> 2;
    B b;
    split(float(at(t, g)), b.hi[0], b.lo[0]);
    split(float(at(t + 4, g)), b.hi[1], b.lo[1]);
    return b;
  }
  template <class At>
  __device__ static B make_b_paired(int lane, At&& at) {
    const int t = lane & 3, g = lane >> 2;
    B b;
    split(float(at(2 * t, g)), b.hi[0], b.lo[0]);
    split(float(at(2 * t + 1, g)), b.hi[1], b.lo[1]);
    return b;
  }

  // Small terms first: they are added to the running sum before the large one.
  __device__ static void mma(float* c, const A& a, const B& b) {
    ptx::mma_1688_tf32(c, a.lo, b.hi);
    ptx::mma_1688_tf32(c, a.hi, b.lo);
    ptx::mma_1688_tf32(c, a.hi, b.hi);
  }
  __device__ static void mma_if(bool on, float* c, const A& a, const B& b) {
    ptx::mma_1688_tf32_if(on, c, a.lo, b.hi);
    ptx::mma_1688_tf32_if(on, c, a.hi, b.lo);
    ptx::mma_1688_tf32_if(on, c, a.hi, b.hi);
  }
  // The three products into a zeroed fragment, then added to c by FADD. The tensor
  // cores are reported to add into their float32 accumulator with truncation, not
  // round-to-nearest (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
  // 2021): a biased error per instruction that grows with the instructions summed
  // into one accumulator (docs/gemm.md, "Precision": gemm's float32 out measured
  // 1.3e-5 relative where the split gives ~2^-21). Promoting per k-step leaves one
  // truncation per k-step, relative to that step's partial sum, and round-to-nearest
  // additions. Costs 4 FADDs per 3 mma.
  __device__ static void mma_promoted_if(bool on, float* c, const A& a, const B& b) {
    float t[4] = {0.f, 0.f, 0.f, 0.f};
    mma_if(on, t, a, b);
#pragma unroll
    for (int e = 0; e < 4; ++e) c[e] += t[e];
  }
};

// Two accumulator values (adjacent columns) to memory in the element type.
template <class T>
__device__ __forceinline__ void store2(T* dst, float x, float y) {
  if constexpr (sizeof(T) == 4) *reinterpret_cast<float2*>(dst) = make_float2(x, y);
  else *reinterpret_cast<uint32_t*>(dst) = ptx::pack2<T>(x, y);
}

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

}  // namespace nbhd::cuda
