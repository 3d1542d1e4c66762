// SPDX-License-Identifier: Apache-2.0
#include "tma_probe.hpp"

#include "cuda/common/pipeline.cuh"
#include "cuda/common/shared_memory.hpp"
#include "cuda/common/tma.cuh"

namespace nbhd::cuda {

__global__ void tma_probe_kernel(const __grid_constant__ TmaProbeParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint64_t& loaded = *reinterpret_cast<uint64_t*>(smem_raw);
  // The 128-byte swizzle repeats every 1024 bytes: the box starts on such a boundary.
  const uint32_t after = ptx::smem_address(smem_raw) + 16;
  unsigned char* box = smem_raw + 16 + ((1024 - (after & 1023)) & 1023);
  if (threadIdx.x == 0) {
    pipeline::init(&loaded, 1);
    pipeline::fence_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tma::prefetch(&p.map);
    pipeline::arrive_expect_tx(&loaded, p.bytes);
    tma::load(ptx::smem_address(box), &p.map, &loaded, p.coordinates, p.dims);
  }
  pipeline::wait(&loaded, 0);
  for (uint32_t i = threadIdx.x; i < p.bytes; i += blockDim.x) p.out[i] = box[i];
}

cudaError_t launch_tma_probe(const TmaProbeParams& p, cudaStream_t stream) {
  const int bytes = int(p.bytes) + 1024 + 16;  // the barrier, then the aligned box
  // The opt-in is the kernel's limit from its first call on: the device's maximum,
  // as boxes differ from launch to launch.
  if (const cudaError_t e = allow_shared_memory<tma_probe_kernel>(); e != cudaSuccess) return e;
  tma_probe_kernel<<<1, 128, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda
