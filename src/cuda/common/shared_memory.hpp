// SPDX-License-Identifier: Apache-2.0
// Above 48 KB of dynamic shared memory a kernel must opt in, per device: a process
// that uses two GPUs (a model split over them, DataParallel) needs the opt-in on
// each. Done once per kernel and device, and not remembered when it fails.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace nbhd::cuda {

// Lets `Kernel` launch with up to `bytes` of dynamic shared memory on the current
// device (0: the device's opt-in maximum). The first call's bytes stay the kernel's
// limit, even below 48 KB: a kernel whose launches differ passes their largest, or 0.
template <auto Kernel>
cudaError_t allow_shared_memory(int bytes = 0) {
  static std::atomic<uint64_t> done{0};  // bit d: device d
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  if (bytes == 0) err = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

}  // namespace nbhd::cuda
