// SPDX-License-Identifier: Apache-2.0
// TMA copies (cp.async.bulk.tensor): one thread moves a box of a tensor map
// (tensor_map.hpp) into shared memory, and the bytes complete a phase of an
// mbarrier that the thread armed with their count (pipeline::arrive_expect_tx).
// Compiled for sm_90a only; elsewhere the wrappers trap.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "cuda/common/ptx.cuh"
#include "cuda/common/wgmma.cuh"

namespace nbhd::cuda::tma {

// Brings a tensor map (a kernel parameter) into the cache ahead of its first copy.
__device__ __forceinline__ void prefetch(const CUtensorMap* map) {
#if NBHD_WGMMA_ENABLED
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#else
  __trap();
#endif
}

// The box of `map` at coordinates c[0..dims) (innermost first) into shared memory
// at `dst` (1024-byte aligned for the 128-byte swizzle); its bytes complete on
// `barrier`.
__device__ __forceinline__ void load(uint32_t dst, const CUtensorMap* map, uint64_t* barrier, const int32_t* c,
                                     int dims) {
#if NBHD_WGMMA_ENABLED
  const uint64_t m = reinterpret_cast<uint64_t>(map);
  const uint32_t bar = ptx::smem_address(barrier);
  switch (dims) {
    case 1:
      asm volatile("cp.async.bulk.tensor.1d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2}], [%3];\n"
                   ::"r"(dst), "l"(m), "r"(c[0]), "r"(bar) : "memory");
      break;
    case 2:
      asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                   ::"r"(dst), "l"(m), "r"(c[0]), "r"(c[1]), "r"(bar) : "memory");
      break;
    case 3:
      asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                   ::"r"(dst), "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(bar) : "memory");
      break;
    case 4:
      asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                   ::"r"(dst), "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(bar) : "memory");
      break;
    default:
      asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n"
                   ::"r"(dst), "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]), "r"(bar) : "memory");
  }
#else
  __trap();
#endif
}

}  // namespace nbhd::cuda::tma
