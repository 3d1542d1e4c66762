// SPDX-License-Identifier: Apache-2.0
// Memory and streams on the device a backend runs on: host memory for the CPU
// backends, the CUDA runtime for the CUDA ones (only when built with
// NBHD_BENCH_CUDA; otherwise asking for CUDA memory is an error, not a crash).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "nbhd/api.hpp"

namespace nbhd::bench {

// Whether a CUDA GPU can be used here; `why_not` says why not (no runtime built in,
// no device, driver error).
bool gpu_available(std::string* why_not = nullptr);

// "NVIDIA H100 80GB HBM3" or the CPU's model name.
std::string device_name(Device device);

// Bytes of L2 cache of the current GPU (0 on the CPU or when unknown).
size_t l2_cache_bytes(Device device);

// One allocation on a device. Moves, never copies.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  static Status allocate(Device device, size_t bytes, Buffer* out);

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

  Status upload(const void* host);   // host -> this (all bytes)
  Status download(void* host) const; // this -> host (all bytes)
  Status fill_bytes(unsigned char value, void* stream = nullptr);
  // Copies min(bytes) of `src` (same device) into this, on `stream` (CUDA).
  Status copy_from(const Buffer& src, void* stream = nullptr);

 private:
  void release();
  Device device_ = Device::kCPU;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A densely packed tensor that owns its memory.
struct Tensor {
  Buffer buffer;
  TensorRef ref;  // undefined (data == nullptr) for an absent optional tensor

  static Status allocate(Device device, DType dtype, const std::vector<int64_t>& shape, Tensor* out);
  // A host copy (same dtype, shape and strides).
  Status to_host(Tensor* out) const;
};

// A stream to run on and synchronize with (null on the CPU).
class Stream {
 public:
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream();
  Status create(Device device);
  void* get() const { return stream_; }
  Status synchronize() const;

 private:
  void* stream_ = nullptr;
};

}  // namespace nbhd::bench
