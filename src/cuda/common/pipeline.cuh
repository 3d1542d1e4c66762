// SPDX-License-Identifier: Apache-2.0
// Producer/consumer synchronisation of the warp-specialized sm_90a kernels: a
// producer warpgroup issues cp.async copies into a ring of shared-memory stages and
// consumer warpgroups compute on them, with no CTA-wide barrier in the main loop.
//
// Each stage has two mbarriers (PTX ISA, "mbarrier"): `full` completes a phase when
// every producer thread's copies into the stage have landed (cp.async.mbarrier.arrive
// .noinc: the arrival is counted when the thread's earlier copies complete), `empty`
// when every consumer warp is done reading the stage. Waits name the parity of the
// phase they wait for: pass k over stage s waits full[s] with parity k % 2; the
// producer waits empty[s] with parity (k % 2) ^ 1, which the barrier's initial phase
// already satisfies on the first pass.
//
// Compiled for sm_90a only (setmaxnreg, try_wait); elsewhere the wrappers trap.
#pragma once

#include <cstdint>

#include "cuda/common/wgmma.cuh"

namespace nbhd::cuda::pipeline {

__device__ __forceinline__ void init(uint64_t* barrier, uint32_t arrivals) {
#if NBHD_WGMMA_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(ptx::smem_address(barrier)), "r"(arrivals) : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void arrive(uint64_t* barrier) {
#if NBHD_WGMMA_ENABLED
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(ptx::smem_address(barrier)) : "memory");
#else
  __trap();
#endif
}

// Makes this thread's mbarrier.init visible to the async proxy (TMA completes
// transactions on the barriers), before the CTA barrier that publishes them.
__device__ __forceinline__ void fence_init() {
#if NBHD_WGMMA_ENABLED
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}

// Arrives on `barrier` and adds `bytes` to the transaction count its phase waits
// for: the TMA copies this thread issues next complete them (tma.cuh).
__device__ __forceinline__ void arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
#if NBHD_WGMMA_ENABLED
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(ptx::smem_address(barrier)), "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

// Arrives on `barrier` once every cp.async this thread issued before has landed.
__device__ __forceinline__ void arrive_after_copies(uint64_t* barrier) {
#if NBHD_WGMMA_ENABLED
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(ptx::smem_address(barrier)) : "memory");
#else
  __trap();
#endif
}

// Blocks until the phase of `barrier` with this parity has completed (acquire).
__device__ __forceinline__ void wait(uint64_t* barrier, uint32_t parity) {
#if NBHD_WGMMA_ENABLED
  const uint32_t address = ptx::smem_address(barrier);
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
#else
  __trap();
#endif
}

// Waits for every cp.async this thread issued (before it exits: copies must not
// outlive the thread that issued them).
__device__ __forceinline__ void wait_all_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Barrier `id` (1-15; 0 is __syncthreads) among kThreads threads of whole warps:
// the consumer warpgroups meet without the producer (bar.sync, any architecture).
template <int kThreads>
__device__ __forceinline__ void named_barrier(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}
// Counts this warp's threads toward barrier `id` without waiting (bar.arrive): the
// other side of a named_barrier, for one warpgroup to let another go on.
// Predicated rather than branched over, so that it can sit between a wgmma's commit
// and its wait: ptxas serialises every wgmma of a kernel (C7518) when one stays in
// flight across a branch.
template <int kThreads>
__device__ __forceinline__ void named_arrive_if(bool arrive, int id) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@p bar.arrive %1, %2;\n}\n" ::"r"(int(arrive)), "r"(id), "n"(kThreads)
      : "memory");
}

// Moves registers between the warpgroups of a CTA (every thread of a warpgroup
// executes it): the producer gives back what the consumers take.
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
#if NBHD_WGMMA_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
#if NBHD_WGMMA_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

}  // namespace nbhd::cuda::pipeline
