// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/fused/backward_ptx.cuh (tests/cuda/fused_emulator).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nbhd::cuda::ptx {

inline void cp_async_8(uint32_t smem, const void* gmem, int valid_bytes) { emu::block->cp_async(smem, gmem, 8, valid_bytes); }

inline void red_add2(float* dst, float x, float y) {
  if (reinterpret_cast<uintptr_t>(dst) % 8) emu::die("red.global.add.v2.f32 misaligned", emu::block->thread());
  dst[0] += x;
  dst[1] += y;
}

inline void bulk_reduce_add(float* dst, uint32_t src, int bytes) { emu::block->bulk_reduce_add(dst, src, bytes); }
inline void bulk_commit() { emu::block->bulk_commit(); }
template <int kPending>
inline void bulk_wait_read() {
  emu::block->bulk_wait(kPending);
}
template <int kPending>
inline void bulk_wait() {
  emu::block->bulk_wait(kPending);
}

}  // namespace nbhd::cuda::ptx
