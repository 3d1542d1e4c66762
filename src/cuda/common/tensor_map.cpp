// SPDX-License-Identifier: Apache-2.0
#include "cuda/common/tensor_map.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace nbhd::cuda {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled as of CUDA 12.0, from the driver the runtime loaded.
EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return EncodeTiled(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

Status encode_tensor_map(const TmaView& view, const void* base, DType dtype, CUtensorMap* map) {
  if (reinterpret_cast<uintptr_t>(base) % 16)
    return unsupported("a tensor map needs a 16-byte-aligned base address; the tensor starts at " +
                       std::to_string(reinterpret_cast<uintptr_t>(base) % 16) + " bytes past one");
  CUtensorMapDataType type;
  switch (dtype) {
    case DType::kFloat16: type = CU_TENSOR_MAP_DATA_TYPE_FLOAT16; break;
    case DType::kBFloat16: type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; break;
    case DType::kFloat32: type = CU_TENSOR_MAP_DATA_TYPE_FLOAT32; break;
    default: return unsupported(std::string("no tensor map for ") + name(dtype));
  }
  const EncodeTiled encode = encoder();
  if (!encode) return unsupported("the CUDA driver has no cuTensorMapEncodeTiled (driver older than CUDA 12.0)");
  cuuint64_t extent[kTmaMaxDims], stride[kTmaMaxDims - 1];
  cuuint32_t box[kTmaMaxDims], element_stride[kTmaMaxDims];
  for (int i = 0; i < view.dims; ++i) {
    extent[i] = view.extent[i];
    box[i] = view.box[i];
    element_stride[i] = view.element_stride[i];
    if (i > 0) stride[i - 1] = view.stride_bytes[i];
  }
  const CUresult r = encode(map, type, cuuint32_t(view.dims), const_cast<void*>(base), extent, stride, box,
                            element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status(StatusCode::kInternal, "cuTensorMapEncodeTiled refused a " + std::to_string(view.dims) +
                                             "-dim view (CUresult " + std::to_string(int(r)) + ")");
  return Status::Ok();
}

}  // namespace nbhd::cuda
