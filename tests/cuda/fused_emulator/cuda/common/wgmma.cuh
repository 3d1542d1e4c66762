// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/common/wgmma.cuh (tests/cuda/fused_emulator): the
// same functions, as warpgroup collectives of the emulated runtime. Operands are
// read through the descriptors as the PTX ISA defines the 128-byte-swizzled
// canonical layouts (K-major: rows 8 x 128 bytes per stride offset; MN-major: 64
// columns per leading offset, 8 rows of K per stride offset; the swizzle XORs
// address bits 4-6 with bits 7-9), so a layout or descriptor mistake in the kernel
// shows here as wrong numbers.
// The asynchrony is emulated at one end of the window or the other (EMU_WGMMA):
// late (the default) queues each thread's wgmmas and executes them, in issue order,
// at the wait_group that retires their commit group (reading shared memory then,
// the last moment a real one may); early executes each where it is issued. Late
// aborts on a write to an in-flight wgmma's accumulators or A registers (they are
// compared at execution with what the kernel left at issue) and on a thread that
// exits with wgmmas not waited for; a read of an accumulator before its wait sees
// the value from before the product, so the numbers go wrong.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>

#include "cuda/common/ptx.cuh"

namespace nbhd::cuda::wgmma {

inline uint64_t descriptor(uint32_t start, uint32_t leading, uint32_t stride) {
  return uint64_t((start & 0x3ffff) >> 4) | (uint64_t((leading & 0x3ffff) >> 4) << 16) |
         (uint64_t((stride & 0x3ffff) >> 4) << 32) | (uint64_t(1) << 62);
}
inline void fence() {}
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

inline bool late() {
  static const bool l = !(std::getenv("EMU_WGMMA") && std::string(std::getenv("EMU_WGMMA")) == "early");
  return l;
}

// A wgmma issued and not yet executed (late): what the instruction took at issue.
struct Pending {
  void (*run)(const Pending&);  // the product, as mma_ss / mma_rs of its template
  uint64_t desc[2];             // mma_rs: desc[1] only
  bool accumulate;
  float* d;
  int count;                    // kN / 2 accumulators at d
  const uint32_t* a_at;         // mma_rs: where the kernel keeps A; nullptr for mma_ss
  uint32_t a[4];                // mma_rs: A as issued
  long group;                   // -1 until committed
  uint32_t expect[64];          // d's bits as the kernel must leave them until execution
};
// Per thread of the block: the queue in issue order and the commit groups so far.
// Lane::wgmma_pending counts the queue for the block's exit check.
struct Queue {
  std::deque<Pending> ops;
  long groups = 0;
};
inline Queue& queue() {
  static Queue queues[1024];
  Queue& q = queues[emu::block->thread()];
  if (emu::block->lane().wgmma_pending == 0) q.ops.clear();  // a new block
  return q;
}
inline void issue(Pending p) {
  std::memcpy(p.expect, p.d, sizeof(float) * std::size_t(p.count));
  p.group = -1;
  queue().ops.push_back(p);
  ++emu::block->lane().wgmma_pending;
}
// Executes the oldest ops while their groups leave more than `keep` committed
// groups; every thread of a warpgroup retires the same ops in the same order (the
// kernels issue and wait warpgroup-uniformly), so the collectives pair up.
inline void retire(int keep) {
  Queue& q = queue();
  while (!q.ops.empty() && q.ops.front().group >= 0 && q.ops.front().group < q.groups - keep) {
    const Pending p = q.ops.front();
    q.ops.pop_front();
    --emu::block->lane().wgmma_pending;
    if (std::memcmp(p.expect, p.d, sizeof(float) * std::size_t(p.count)))
      emu::die("wgmma: accumulator registers written while the wgmma was in flight (before its wait_group)",
               emu::block->thread());
    if (p.a_at && std::memcmp(p.a, p.a_at, sizeof p.a))
      emu::die("wgmma: A registers of an mma_rs written while it was in flight (before its wait_group)",
               emu::block->thread());
    p.run(p);
    // What it wrote is what a later op on the same registers must find there: a
    // chain of accumulating products changes d between executions legitimately.
    const uintptr_t lo = reinterpret_cast<uintptr_t>(p.d), hi = lo + sizeof(float) * std::size_t(p.count);
    for (Pending& later : q.ops)
      for (int i = 0; i < later.count; ++i) {
        const uintptr_t at = reinterpret_cast<uintptr_t>(later.d + i);
        if (at >= lo && at < hi) std::memcpy(&later.expect[i], later.d + i, sizeof(float));
      }
  }
}

}  // namespace detail

// Closes the thread's open wgmmas into a group (an empty one if none, as on the GPU).
inline void commit_group() {
  if (!detail::late()) return;
  detail::Queue& q = detail::queue();
  for (detail::Pending& p : q.ops)
    if (p.group < 0) p.group = q.groups;
  ++q.groups;
}
template <int kPending>
inline void wait_group() {
  if (detail::late()) detail::retire(kPending);
}

namespace detail {

// The products, executed: each thread publishes its operands in its Lane (the
// collective reads every lane's A and checks that the descriptors agree).
template <class T, int kN, bool kTransA, bool kTransB>
inline void run_ss(float* d, uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  constexpr bool bf16 = ptx::MmaName<T>::kBf16;
  emu::Lane& l = emu::block->lane();
  l.desc[0] = a_desc;
  l.desc[1] = b_desc;
  l.pred = accumulate;
  const Desc a = decode(a_desc), b = decode(b_desc);
  warpgroup_mma<kN>(
      d, accumulate,
      [&](int, int row, int k) { return kTransA ? mn_major(a, k, row, bf16) : k_major(a, row, k, bf16); },
      [&](int k, int col) { return kTransB ? mn_major(b, k, col, bf16) : k_major(b, col, k, bf16); });
}

template <class T, int kN>
inline void run_rs(float* d, const uint32_t* a, uint64_t b_desc, bool accumulate) {
  constexpr bool bf16 = ptx::MmaName<T>::kBf16;
  emu::Lane& l = emu::block->lane();
  for (int i = 0; i < 4; ++i) l.a[i] = a[i];
  l.desc[0] = 0;
  l.desc[1] = b_desc;
  l.pred = accumulate;
  const Desc b = decode(b_desc);
  emu::Block* blk = emu::block;
  // A from the registers of the warp owning the row (mma.sync m16n8k16 A layout).
  auto a_of = [&](int group, int row, int k) {
    const int w = 4 * group + row / 16, r = row % 16, lane = 4 * (r % 8) + (k % 8) / 2;
    const int reg = r / 8 + 2 * (k / 8);
    return emu::half_of(blk->lane_of(32 * w + lane).a[reg], k % 2, bf16);
  };
  warpgroup_mma<kN>(d, accumulate, a_of, [&](int k, int col) { return mn_major(b, k, col, bf16); });
}

// A queued op's product, executed with what it took at issue.
template <class T, int kN, bool kTransA, bool kTransB>
inline void retired_ss(const Pending& p) {
  run_ss<T, kN, kTransA, kTransB>(p.d, p.desc[0], p.desc[1], p.accumulate);
}
template <class T, int kN>
inline void retired_rs(const Pending& p) {
  run_rs<T, kN>(p.d, p.a, p.desc[1], p.accumulate);
}

}  // namespace detail

template <class T, int kN, bool kTransA = false, bool kTransB = false>
inline void mma_ss(float* d, uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_ss: N of 32, 64 or 128");
  if (!detail::late()) return detail::run_ss<T, kN, kTransA, kTransB>(d, a_desc, b_desc, accumulate);
  (void)detail::decode(a_desc);  // a bad descriptor aborts at its issue
  (void)detail::decode(b_desc);
  detail::issue({&detail::retired_ss<T, kN, kTransA, kTransB>, {a_desc, b_desc}, accumulate, d, kN / 2, nullptr, {}, -1, {}});
}

template <class T, int kN>
inline void mma_rs(float* d, const uint32_t* a, uint64_t b_desc, bool accumulate) {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma_rs: N of 32, 64 or 128");
  if (!detail::late()) return detail::run_rs<T, kN>(d, a, b_desc, accumulate);
  (void)detail::decode(b_desc);
  detail::issue({&detail::retired_rs<T, kN>, {0, b_desc}, accumulate, d, kN / 2, a, {a[0], a[1], a[2], a[3]}, -1, {}});
}

}  // namespace nbhd::cuda::wgmma
