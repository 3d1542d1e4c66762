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

// A small-window problem for the halo kernels (issue 20's shapes, small): windows of
// 1-9 keys per axis (1-5 in 3-D) with dilation 1-4 (unequal groups), strides, causal
// or periodic axes, extents no tile divides, GQA, rpb, float16 or bfloat16, head dims
// 16-64 in `bucket` (32 or 64) with dim_v apart, no additional tokens.
inline Problem small_window_problem(std::mt19937_64& rng, int rank, int bucket) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const int64_t dims[2][3] = {{16, 24, 32}, {40, 48, 64}};
  Problem p;
  p.rank = rank;
  p.dtype = uniform(0, 1) ? DType::kBFloat16 : DType::kFloat16;
  const int64_t max_extent = rank == 1 ? 160 : rank == 2 ? 30 : 11;
  for (int a = 0; a < rank; ++a) {
    p.kernel[a] = uniform(1, rank == 3 ? 5 : 9);
    p.dilation[a] = uniform(0, 2) == 0 ? uniform(2, 4) : 1;
    if (p.kernel[a] * p.dilation[a] > max_extent) p.dilation[a] = 1;
    p.extent[a] = uniform(p.kernel[a] * p.dilation[a], max_extent);
    p.stride[a] = uniform(0, 2) == 0 ? uniform(1, p.kernel[a]) : 1;
    p.causal[a] = uniform(0, 3) == 0;
    p.periodic[a] = !p.causal[a] && uniform(0, 3) == 0;
  }
  p.batch = uniform(1, 2);
  p.kv_heads = uniform(1, 2);
  p.heads = p.kv_heads * uniform(1, 2);
  const int64_t* in_bucket = dims[bucket == 64];
  p.dim = in_bucket[uniform(0, 2)];
  p.dim_v = uniform(0, 2) == 0 ? in_bucket[uniform(0, 2)] : 0;
  if (uniform(0, 2) == 0) p.scale = std::uniform_real_distribution<double>(0.1, 1.5)(rng);
  p.has_rpb = uniform(0, 1) == 1;
  return p;
}

}  // namespace nbhd::testing
