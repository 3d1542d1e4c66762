// SPDX-License-Identifier: Apache-2.0
// A kernel that makes one TMA copy (tma.cuh) of a tensor map's box into shared
// memory and writes the shared memory out as it is (swizzle included), so that a
// test can check the tensor map and the copy against the view it came from.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nbhd::cuda {

struct TmaProbeParams {
  CUtensorMap map;  // 64-byte aligned (its declaration)
  int32_t coordinates[5];
  int dims;
  uint32_t bytes;  // of the box: what the copy completes on the barrier
  unsigned char* out;
};

cudaError_t launch_tma_probe(const TmaProbeParams& p, cudaStream_t stream);

}  // namespace nbhd::cuda
