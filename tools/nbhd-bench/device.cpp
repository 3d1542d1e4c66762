// SPDX-License-Identifier: Apache-2.0
#include "device.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <thread>

#if NBHD_BENCH_CUDA
#include <cuda_runtime.h>
#endif

namespace nbhd::bench {
namespace {

#if NBHD_BENCH_CUDA
Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  const StatusCode code = err == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kDeviceError;
  return Status(code, std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}
#define BENCH_CUDA(expr) NBHD_RETURN_IF_ERROR(cuda_status((expr), #expr))
#endif

[[maybe_unused]] Status no_cuda_runtime() {
  return unsupported("this nbhd-bench was built without the CUDA runtime (the library was configured with NBHD_CUDA=OFF)");
}

}  // namespace

bool gpu_available(std::string* why_not) {
#if NBHD_BENCH_CUDA
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return true;
  if (why_not)
    *why_not = std::string("no usable CUDA GPU on this machine (cudaGetDeviceCount: ") +
               (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")";
  cudaGetLastError();  // leave no sticky error behind
  return false;
#else
  if (why_not) *why_not = no_cuda_runtime().message();
  return false;
#endif
}

std::string device_name(Device device) {
  if (device == Device::kCUDA) {
#if NBHD_BENCH_CUDA
    cudaDeviceProp prop{};
    int index = 0;
    if (cudaGetDevice(&index) == cudaSuccess && cudaGetDeviceProperties(&prop, index) == cudaSuccess) return prop.name;
#endif
    return "cuda (unknown)";
  }
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "cpu";
  while (std::getline(cpuinfo, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) model = line.substr(line.find_first_not_of(' ', colon + 1));
      break;
    }
  return model + " (" + std::to_string(std::thread::hardware_concurrency()) + " threads)";
}

size_t l2_cache_bytes(Device device) {
#if NBHD_BENCH_CUDA
  if (device == Device::kCUDA) {
    cudaDeviceProp prop{};
    int index = 0;
    if (cudaGetDevice(&index) == cudaSuccess && cudaGetDeviceProperties(&prop, index) == cudaSuccess)
      return size_t(prop.l2CacheSize);
  }
#endif
  (void)device;
  return 0;
}

// ---------------------------------------------------------------- Buffer

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    release();
    device_ = other.device_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void Buffer::release() {
  if (!data_) return;
  if (device_ == Device::kCPU) {
    std::free(data_);
  } else {
#if NBHD_BENCH_CUDA
    cudaFree(data_);
#endif
  }
  data_ = nullptr;
  bytes_ = 0;
}

Status Buffer::allocate(Device device, size_t bytes, Buffer* out) {
  Buffer b;
  b.device_ = device;
  b.bytes_ = bytes;
  const size_t request = bytes ? bytes : 1;  // never a null pointer for an empty tensor
  if (device == Device::kCPU) {
    b.data_ = std::malloc(request);
    if (!b.data_)
      return Status(StatusCode::kOutOfMemory, "could not allocate " + std::to_string(bytes) + " bytes of host memory");
  } else {
#if NBHD_BENCH_CUDA
    BENCH_CUDA(cudaMalloc(&b.data_, request));
#else
    return no_cuda_runtime();
#endif
  }
  *out = std::move(b);
  return Status::Ok();
}

Status Buffer::upload(const void* host) {
  if (device_ == Device::kCPU) {
    std::memcpy(data_, host, bytes_);
    return Status::Ok();
  }
#if NBHD_BENCH_CUDA
  BENCH_CUDA(cudaMemcpy(data_, host, bytes_, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaDeviceSynchronize());  // pageable copies may return before the DMA ends
  return Status::Ok();
#else
  return no_cuda_runtime();
#endif
}

Status Buffer::download(void* host) const {
  if (device_ == Device::kCPU) {
    std::memcpy(host, data_, bytes_);
    return Status::Ok();
  }
#if NBHD_BENCH_CUDA
  BENCH_CUDA(cudaMemcpy(host, data_, bytes_, cudaMemcpyDeviceToHost));
  return Status::Ok();
#else
  return no_cuda_runtime();
#endif
}

Status Buffer::fill_bytes(unsigned char value, void* stream) {
  if (device_ == Device::kCPU) {
    std::memset(data_, value, bytes_);
    return Status::Ok();
  }
#if NBHD_BENCH_CUDA
  BENCH_CUDA(cudaMemsetAsync(data_, value, bytes_, static_cast<cudaStream_t>(stream)));
  return Status::Ok();
#else
  (void)stream;
  return no_cuda_runtime();
#endif
}

Status Buffer::copy_from(const Buffer& src, void* stream) {
  const size_t n = std::min(bytes_, src.bytes_);
  if (device_ != src.device_) return invalid_argument("copy between buffers on different devices");
  if (device_ == Device::kCPU) {
    std::memcpy(data_, src.data_, n);
    return Status::Ok();
  }
#if NBHD_BENCH_CUDA
  BENCH_CUDA(cudaMemcpyAsync(data_, src.data_, n, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
  return Status::Ok();
#else
  (void)stream;
  return no_cuda_runtime();
#endif
}

// ---------------------------------------------------------------- Tensor

Status Tensor::allocate(Device device, DType dtype, const std::vector<int64_t>& shape, Tensor* out) {
  Tensor t;
  t.ref.dtype = dtype;
  t.ref.device = device;
  t.ref.ndim = int(shape.size());
  int64_t count = 1;
  for (int d = t.ref.ndim - 1; d >= 0; --d) {
    t.ref.shape[d] = shape[d];
    t.ref.stride[d] = count;
    count *= shape[d];
  }
  NBHD_RETURN_IF_ERROR(Buffer::allocate(device, size_t(count) * size_of(dtype), &t.buffer));
  t.ref.data = t.buffer.data();
  *out = std::move(t);
  return Status::Ok();
}

Status Tensor::to_host(Tensor* out) const {
  if (!ref.defined()) {
    *out = Tensor{};
    return Status::Ok();
  }
  Tensor h;
  NBHD_RETURN_IF_ERROR(Buffer::allocate(Device::kCPU, buffer.bytes(), &h.buffer));
  NBHD_RETURN_IF_ERROR(buffer.download(h.buffer.data()));
  h.ref = ref;
  h.ref.data = h.buffer.data();
  h.ref.device = Device::kCPU;
  h.ref.device_index = 0;
  *out = std::move(h);
  return Status::Ok();
}

// ---------------------------------------------------------------- Stream

Stream::~Stream() {
#if NBHD_BENCH_CUDA
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
#endif
}

Status Stream::create(Device device) {
  if (device == Device::kCPU) return Status::Ok();
#if NBHD_BENCH_CUDA
  // A blocking stream: it waits for the uploads and memsets issued on the legacy
  // default stream, so no copy can race a timed kernel.
  cudaStream_t s = nullptr;
  BENCH_CUDA(cudaStreamCreate(&s));
  stream_ = s;
  return Status::Ok();
#else
  return no_cuda_runtime();
#endif
}

Status Stream::synchronize() const {
#if NBHD_BENCH_CUDA
  if (stream_) BENCH_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
#endif
  return Status::Ok();
}

}  // namespace nbhd::bench
