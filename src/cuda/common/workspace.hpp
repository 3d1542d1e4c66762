// SPDX-License-Identifier: Apache-2.0
// Device scratch memory for one call: from the caller's allocator when given (e.g.
// PyTorch's caching allocator), else cudaMallocAsync on the call's stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "cuda/common/check.hpp"
#include "nbhd/api.hpp"

namespace nbhd::cuda {

class Workspace {
 public:
  Workspace(const Options& o) : allocator_(o.allocator), stream_(static_cast<cudaStream_t>(o.stream)) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (!data_) return;
    if (allocator_.deallocate)
      allocator_.deallocate(data_, allocator_.context);
    else
      cudaFreeAsync(data_, stream_);
  }

  // Allocates `bytes`; the error names what it was for and how much it needed.
  Status allocate(std::size_t bytes, const char* purpose) {
    if (bytes == 0) return Status::Ok();
    if (allocator_.allocate) {
      data_ = allocator_.allocate(bytes, allocator_.context);
      if (!data_) return Status(StatusCode::kOutOfMemory, out_of_memory(bytes, purpose));
      return Status::Ok();
    }
    const cudaError_t err = cudaMallocAsync(&data_, bytes, stream_);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state
      data_ = nullptr;
      return Status(StatusCode::kOutOfMemory, out_of_memory(bytes, purpose) + " (" + cudaGetErrorString(err) + ")");
    }
    return Status::Ok();
  }

  void* data() const { return data_; }

 private:
  static std::string out_of_memory(std::size_t bytes, const char* purpose) {
    return "could not allocate " + std::to_string(bytes) + " bytes of GPU workspace for " + purpose;
  }

  Allocator allocator_;
  cudaStream_t stream_;
  void* data_ = nullptr;
};

}  // namespace nbhd::cuda
