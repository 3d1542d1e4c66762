// SPDX-License-Identifier: Apache-2.0
// CUDA runtime errors as Status (host code of the CUDA backends).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "nbhd/status.hpp"

namespace nbhd::cuda {

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  const StatusCode code = err == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kDeviceError;
  return Status(code, std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// After a kernel launch: a bad launch configuration shows up here, not later.
inline Status launch_status(const char* kernel) { return cuda_status(cudaGetLastError(), kernel); }

#define NBHD_CUDA_RETURN_IF_ERROR(expr) NBHD_RETURN_IF_ERROR(::nbhd::cuda::cuda_status((expr), #expr))

}  // namespace nbhd::cuda
