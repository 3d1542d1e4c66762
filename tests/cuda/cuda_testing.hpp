// SPDX-License-Identifier: Apache-2.0
// GPU test utilities: device copies of HostTensors (same strides), and skipping
// when no GPU is present (reported by ctest as skipped, never as passed).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "nbhd/api.hpp"
#include "testing.hpp"

namespace nbhd::testing {

inline bool gpu_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Whether `backend` is compiled into this build.
inline bool built(Backend backend) {
  for (const BackendInfo& b : built_backends())
    if (b.backend == backend) return true;
  return false;
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
    EXPECT_EQ(cudaGetDevice(&ref_.device_index), cudaSuccess);  // allocated on the current device
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

// A device copy of a packed HostTensor [1, tokens, heads, dim] whose token rows lie
// `token_stride` elements apart: element offsets past 2^31 with few tokens (the
// kernels' offset arithmetic, not their work, is what such a test checks).
class StridedDeviceTensor {
 public:
  StridedDeviceTensor(const HostTensor& h, int64_t token_stride) : token_stride_(token_stride) {
    const TensorRef& r = h.ref();
    const int64_t tokens = r.shape[1];
    row_bytes_ = size_t(r.shape[2] * r.shape[3]) * size_of(r.dtype);
    const size_t bytes = size_t((tokens - 1) * token_stride) * size_of(r.dtype) + row_bytes_;
    EXPECT_EQ(cudaMalloc(&data_, bytes), cudaSuccess) << bytes << " bytes";
    if (!data_) return;
    EXPECT_EQ(cudaMemcpy2D(data_, pitch(r), h.storage(), row_bytes_, row_bytes_, tokens, cudaMemcpyHostToDevice),
              cudaSuccess);
    ref_ = TensorRef::contiguous(data_, r.dtype, Device::kCUDA, {1, tokens, r.shape[2], r.shape[3]});
    ref_.stride[0] = tokens * token_stride;
    ref_.stride[1] = token_stride;
  }
  StridedDeviceTensor(const StridedDeviceTensor&) = delete;
  StridedDeviceTensor& operator=(const StridedDeviceTensor&) = delete;
  ~StridedDeviceTensor() {
    if (data_) cudaFree(data_);
  }
  const TensorRef& ref() const { return ref_; }
  // Copies the device rows back into the packed tensor `h` it came from.
  void copy_to(HostTensor& h) const {
    if (data_)
      EXPECT_EQ(cudaMemcpy2D(h.storage(), row_bytes_, data_, pitch(h.ref()), row_bytes_, h.ref().shape[1],
                             cudaMemcpyDeviceToHost),
                cudaSuccess);
  }

 private:
  size_t pitch(const TensorRef& r) const { return size_t(token_stride_) * size_of(r.dtype); }
  int64_t token_stride_;
  size_t row_bytes_ = 0;
  TensorRef ref_;
  void* data_ = nullptr;
};

}  // namespace nbhd::testing
