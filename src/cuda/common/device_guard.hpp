// SPDX-License-Identifier: Apache-2.0
// Makes the tensors' GPU current for one call and restores the caller's afterwards,
// so a call on cuda:1 works whatever device the calling thread had selected.
#pragma once

#include <cuda_runtime.h>

#include "cuda/common/check.hpp"

namespace nbhd::cuda {

class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

  Status set(int device) {
    int current = 0;
    NBHD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
    if (current == device) return Status::Ok();
    NBHD_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    previous_ = current;
    return Status::Ok();
  }

 private:
  int previous_ = -1;
};

}  // namespace nbhd::cuda
