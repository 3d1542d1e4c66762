// SPDX-License-Identifier: Apache-2.0
#include "cuda/common/kernel_image.hpp"

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "cuda/common/check.hpp"

namespace nbhd::cuda {
namespace {

// Compiled with every other kernel's -gencode flags: where it has an image for a GPU,
// they all do.
__global__ void kernel_image_probe() {}

}  // namespace

Status check_kernel_image(const char* backend) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // no GPU: the launch says what is wrong
    return Status::Ok();
  }
  // Per device: 0 unknown, 1 runs, 2 no image.
  static std::array<std::atomic<int>, 64> known{};
  std::atomic<int>* slot = device < int(known.size()) ? &known[size_t(device)] : nullptr;
  if (slot && slot->load(std::memory_order_relaxed) == 1) return Status::Ok();
  if (!slot || slot->load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attributes;
    const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel_image_probe);
    cudaGetLastError();  // not sticky, but left as the last error otherwise
    const bool no_image = err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
                          err == cudaErrorInvalidPtx || err == cudaErrorUnsupportedPtxVersion;
    if (err != cudaSuccess && !no_image) return cuda_status(err, "cudaFuncGetAttributes of the kernel-image probe");
    if (slot) slot->store(no_image ? 2 : 1, std::memory_order_relaxed);
    if (!no_image) return Status::Ok();
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return unsupported(std::string("backend ") + backend + " has no kernel image for this GPU (compute capability " +
                     std::to_string(major) + "." + std::to_string(minor) + "): this build holds NBHD_CUDA_ARCHS=" +
                     NBHD_CUDA_ARCHS_BUILT + " (no machine code or PTX for it); rebuild with its architecture in NBHD_CUDA_ARCHS");
}

}  // namespace nbhd::cuda
