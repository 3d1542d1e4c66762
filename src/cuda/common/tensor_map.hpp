// SPDX-License-Identifier: Apache-2.0
// A TmaView as a CUDA tensor map (cuTensorMapEncodeTiled), for 128-byte-swizzled
// copies into shared memory: the layout the wgmma kernels read (wgmma.cuh). The
// driver function is taken from the runtime's entry-point table, so the library does
// not link libcuda; the CPU emulator supplies its own.
#pragma once

#include <cuda.h>  // CUtensorMap and the encoder's types only

#include "cuda/common/tma_view.hpp"
#include "nbhd/dtype.hpp"
#include "nbhd/status.hpp"

namespace nbhd::cuda {

// Encodes `view` over the tensor whose element (0, ..., 0) is at `base`. Refused
// (kUnsupported, with the reason) where TMA cannot address the tensor: a base not
// 16-byte aligned; kInternal where the driver refuses the view.
Status encode_tensor_map(const TmaView& view, const void* base, DType dtype, CUtensorMap* map);

}  // namespace nbhd::cuda
