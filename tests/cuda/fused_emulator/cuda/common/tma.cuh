// SPDX-License-Identifier: Apache-2.0
// Emulated stand-in for src/cuda/common/tma.cuh (tests/cuda/fused_emulator): the
// copy is the emulated block's (cuda_runtime.h, Block::tma_load), from the
// TensorMapModel that the emulated cuTensorMapEncodeTiled wrote into the map.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.cuh"

namespace nbhd::cuda::tma {

inline void prefetch(const CUtensorMap*) {}

inline void load(uint32_t dst, const CUtensorMap* map, uint64_t* barrier, const int32_t* c, int dims) {
  emu::block->tma_load(*reinterpret_cast<const emu::TensorMapModel*>(map), dst, ptx::smem_address(barrier), c, dims);
}

}  // namespace nbhd::cuda::tma
