// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/common/ptx.cuh (tests/cuda/fused_emulator): the same
// functions, as warp collectives of the emulated runtime. Fragment layouts are the
// PTX ISA's, implemented once in cuda_runtime.h (Block::execute).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nbhd::cuda::ptx {

template <class T> struct MmaName;
template <> struct MmaName<__half> { static constexpr bool kBf16 = false; };
template <> struct MmaName<__nv_bfloat16> { static constexpr bool kBf16 = true; };

// One mma.sync as a warp collective: variant 0 / 1 m16n8k16 fp16 / bf16, 2 m16n8k8
// tf32 (cuda_runtime.h, Block::execute).
inline void mma(int variant, bool on, float* d, const uint32_t* a, const uint32_t* b) {
  emu::Lane& l = emu::block->lane();
  l.op = emu::Op::kMma;
  l.variant = variant;
  l.pred = on;
  for (int i = 0; i < 4; ++i) l.a[i] = a[i], l.c[i] = d[i];
  l.b[0] = b[0];
  l.b[1] = b[1];
  emu::block->warp_op();
  for (int i = 0; i < 4; ++i) d[i] = emu::block->lane().fout[i];
}

template <class T>
inline void mma_16816_if(bool on, float* d, const uint32_t* a, const uint32_t* b) {
  mma(MmaName<T>::kBf16 ? 1 : 0, on, d, a, b);
}
template <class T>
inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
  mma_16816_if<T>(true, d, a, b);
}
inline void mma_1688_tf32_if(bool on, float* d, const uint32_t* a, const uint32_t* b) { mma(2, on, d, a, b); }
inline void mma_1688_tf32(float* d, const uint32_t* a, const uint32_t* b) { mma(2, true, d, a, b); }

// cvt.rna.tf32.f32: nearest, ties away from zero, to 10 mantissa bits (finite x).
inline uint32_t to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;
  return (bits + 0x1000u) & ~0x1fffu;
}

// Shared-memory "addresses" are offsets into the running block's buffer.
inline uint32_t smem_address(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < emu::block->smem() || c > emu::block->smem() + emu::block->smem_size()) emu::die("smem_address of a non-shared pointer", emu::block->thread());
  return uint32_t(c - emu::block->smem());
}

inline void ldmatrix(uint32_t* r, uint32_t address, bool trans) {
  emu::Lane& l = emu::block->lane();
  l.op = emu::Op::kLdmatrix;
  l.variant = trans ? 1 : 0;
  l.addr = address;
  emu::block->warp_op();
  for (int i = 0; i < 4; ++i) r[i] = emu::block->lane().out[i];
}
inline void ldmatrix_x4(uint32_t* r, uint32_t address) { ldmatrix(r, address, false); }
inline void ldmatrix_x4_trans(uint32_t* r, uint32_t address) { ldmatrix(r, address, true); }

inline void cp_async_16(uint32_t smem, const void* gmem, int valid_bytes) { emu::block->cp_async(smem, gmem, 16, valid_bytes); }
inline void cp_async_4(uint32_t smem, const void* gmem, int valid_bytes) { emu::block->cp_async(smem, gmem, 4, valid_bytes); }
inline void cp_async_commit() { emu::block->cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::block->cp_async_wait(kPending);
}

// MUFU.EX2 flushes denormals; exp2f is close enough for the tolerance rule.
inline float exp2_approx(float x) { return std::exp2(x); }

template <class T>
inline uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (MmaName<T>::kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&r, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::memcpy(&r, &v, 4);
  }
  return r;
}

}  // namespace nbhd::cuda::ptx
