// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/common/wgmma.cuh (tests/cuda/fused_emulator): the
// same functions, as warpgroup collectives of the emulated runtime. Operands are
// read through the descriptors as the PTX ISA defines the 128-byte-swizzled
// canonical layouts (K-major: rows 8 x 128 bytes per stride offset; MN-major: 64
// columns per leading offset, 8 rows of K per stride offset; the swizzle XORs
// address bits 4-6 with bits 7-9), so a layout or descriptor mistake in the kernel
// shows here as wrong numbers. The asynchrony (commit, wait) is not emulated: each
// instruction completes where it is issued.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.cuh"

namespace nbhd::cuda::wgmma {

inline uint64_t descriptor(uint32_t start, uint32_t leading, uint32_t stride) {
  return uint64_t((start & 0x3ffff) >> 4) | (uint64_t((leading & 0x3ffff) >> 4) << 16) |
         (uint64_t((stride & 0x3ffff) >> 4) << 32) | (uint64_t(1) << 62);
}
inline void fence() {}
inline void commit_group() {}
template <int kPending>
inline void wait_group() {}
inline void fence_proxy_async() {}
template <int kN, class R>
inline void fence_operands(R*) {}

namespace detail {

struct Desc {
  uint32_t start, leading, stride;
};
inline Desc decode(uint64_t d) {
  if ((d >> 62) != 1) emu::die("wgmma descriptor: only the 128-byte swizzle is emulated", emu::block->thread());
  if ((d >> 49) & 7) emu::die("wgmma descriptor: nonzero base offset", emu::block->thread());
  return {uint32_t(d & 0x3fff) << 4, uint32_t((d >> 16) & 0x3fff) << 4, uint32_t((d >> 32) & 0x3fff) << 4};
}
inline uint32_t swizzle(uint32_t linear) { return linear ^ (((linear >> 7) & 7) << 4); }
inline float element(uint32_t address, bool bf16) {
  if (address % 2 || address + 2 > emu::block->smem_size()) emu::die("wgmma operand outside shared memory", emu::block->thread());
  return emu::half_of(emu::smem16(0, address), 0, bf16);
}
// K-major: element (row, k), k < 16, of an operand whose 8-row groups are `stride` apart.
inline float k_major(const Desc& d, int row, int k, bool bf16) {
  return element(swizzle(d.start + (row / 8) * d.stride + (row % 8) * 128 + 2 * k), bf16);
}
// MN-major: element (k, n), k < 16: 64-column slabs `leading` apart, 8-row groups of k `stride` apart.
inline float mn_major(const Desc& d, int k, int n, bool bf16) {
  return element(swizzle(d.start + (n / 64) * d.leading + (k / 8) * d.stride + (k % 8) * 128 + 2 * (n % 64)), bf16);
}

// The warpgroup's D[64 x kN] (+)= A[64 x 16] B[16 x kN]; every thread publishes
// its operands, waits for its warpgroup, computes its own accumulators, waits again.
// a_of(group, row, k) reads A of warpgroup `group`.
template <int kN, class AOf, class BOf>
inline void warpgroup_mma(float* d, bool accumulate, AOf a_of, BOf b_of) {
  emu::Block* blk = emu::block;
  if (blk->dim().x % 128) emu::die("wgmma is emulated for blocks of whole warpgroups");
  blk->group_barrier();
  const int t = blk->thread(), group = t / 128, w = (t % 128) / 32, g = (t % 32) / 4, t4 = t % 4;
  const emu::Lane& first = blk->lane_of(128 * group);
  if (blk->lane().desc[0] != first.desc[0] || blk->lane().desc[1] != first.desc[1] ||
      blk->lane().pred != first.pred)
    emu::die("wgmma operands differ across the warpgroup", blk->thread());
  float out[kN / 2];
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + 8 * (e >> 1), col = 8 * j + 2 * t4 + (e & 1);
      double sum = accumulate ? d[4 * j + e] : 0.0;
      for (int k = 0; k < 16; ++k) sum += double(a_of(group, row, k)) * double(b_of(k, col));
      out[4 * j + e] = float(sum);
    }
  blk->group_barrier();
  for (int i = 0; i < kN / 2; ++i) d[i] = out[i];
}

}  // namespace detail

template <class T, int kN, bool kTransA = false, bool kTransB = false>
inline void mma_ss(float* d, uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_ss: N of 32, 64 or 128");
  constexpr bool bf16 = ptx::MmaName<T>::kBf16;
  emu::Lane& l = emu::block->lane();
  l.desc[0] = a_desc;
  l.desc[1] = b_desc;
  l.pred = accumulate;
  const detail::Desc a = detail::decode(a_desc), b = detail::decode(b_desc);
  detail::warpgroup_mma<kN>(
      d, accumulate,
      [&](int, int row, int k) { return kTransA ? detail::mn_major(a, k, row, bf16) : detail::k_major(a, row, k, bf16); },
      [&](int k, int col) { return kTransB ? detail::mn_major(b, k, col, bf16) : detail::k_major(b, col, k, bf16); });
}

template <class T, int kN>
inline void mma_rs(float* d, const uint32_t* a, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_rs: N of 32, 64 or 128");
  constexpr bool bf16 = ptx::MmaName<T>::kBf16;
  emu::Lane& l = emu::block->lane();
  for (int i = 0; i < 4; ++i) l.a[i] = a[i];
  l.desc[0] = 0;
  l.desc[1] = b_desc;
  l.pred = accumulate;
  const detail::Desc b = detail::decode(b_desc);
  emu::Block* blk = emu::block;
  // A from the registers of the warp owning the row (mma.sync m16n8k16 A layout).
  auto a_of = [&](int group, int row, int k) {
    const int w = 4 * group + row / 16, r = row % 16, lane = 4 * (r % 8) + (k % 8) / 2;
    const int reg = r / 8 + 2 * (k / 8);
    return emu::half_of(blk->lane_of(32 * w + lane).a[reg], k % 2, bf16);
  };
  detail::warpgroup_mma<kN>(d, accumulate, a_of, [&](int k, int col) { return detail::mn_major(b, k, col, bf16); });
}

}  // namespace nbhd::cuda::wgmma
