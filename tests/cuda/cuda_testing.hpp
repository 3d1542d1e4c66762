// SPDX-License-Identifier: Apache-2.0
// GPU test utilities: device copies of HostTensors (same strides), and skipping
// when no GPU is present (reported by ctest as skipped, never as passed).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "testing.hpp"

namespace nbhd::testing {

inline bool gpu_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define NBHD_REQUIRE_GPU() \
  if (!::nbhd::testing::gpu_available()) GTEST_SKIP() << "no CUDA GPU on this machine"

// A device copy of a HostTensor, with the same shape and strides.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  explicit DeviceTensor(const HostTensor& h) : ref_(h.ref()), bytes_(h.storage_bytes()) {
    if (!h.ref().defined()) {
      ref_ = TensorRef{};
      return;
    }
    EXPECT_EQ(cudaMalloc(&data_, bytes_), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(data_, h.storage(), bytes_, cudaMemcpyHostToDevice), cudaSuccess);
    ref_.data = data_;
    ref_.device = Device::kCUDA;
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  ~DeviceTensor() {
    if (data_) cudaFree(data_);
  }
  const TensorRef& ref() const { return ref_; }
  // Copies the device contents back into `h` (which must be the tensor it came from).
  void copy_to(HostTensor& h) const {
    if (data_) EXPECT_EQ(cudaMemcpy(h.storage(), data_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  TensorRef ref_;
  size_t bytes_ = 0;
  void* data_ = nullptr;
};

}  // namespace nbhd::testing
