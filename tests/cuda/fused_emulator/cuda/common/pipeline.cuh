// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/common/pipeline.cuh (tests/cuda/fused_emulator):
// mbarriers as objects of the emulated block, keyed by shared-memory address; a
// wait blocks the fiber until the awaited phase completes. setmaxnreg moves
// registers between warpgroups within the CTA's launch allocation; a claim beyond it
// deadlocks (cuda_runtime.h, Block::set_registers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.cuh"

namespace nbhd::cuda::pipeline {

inline void init(uint64_t* barrier, uint32_t arrivals) { emu::block->mbarrier_init(ptx::smem_address(barrier), int(arrivals)); }
inline void arrive(uint64_t* barrier) { emu::block->mbarrier_arrive(ptx::smem_address(barrier)); }
inline void fence_init() {}
inline void arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  emu::block->mbarrier_expect_tx(ptx::smem_address(barrier), int64_t(bytes));
}
inline void arrive_after_copies(uint64_t* barrier) { emu::block->mbarrier_arrive_after_copies(ptx::smem_address(barrier)); }
inline void wait(uint64_t* barrier, uint32_t parity) { emu::block->mbarrier_wait(ptx::smem_address(barrier), parity); }
inline void wait_all_copies() { emu::block->cp_async_wait_all(); }
template <int kThreads>
inline void named_barrier(int id) {
  emu::block->named_barrier(id, kThreads);
}
template <int kThreads>
inline void named_arrive_if(bool arrive, int id) {
  if (arrive) emu::block->named_arrive(id, kThreads);
}
template <int kRegisters>
inline void release_registers() {
  emu::block->set_registers(kRegisters, /*claim=*/false);
}
template <int kRegisters>
inline void claim_registers() {
  emu::block->set_registers(kRegisters, /*claim=*/true);
}

}  // namespace nbhd::cuda::pipeline
