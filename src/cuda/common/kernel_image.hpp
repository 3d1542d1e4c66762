// SPDX-License-Identifier: Apache-2.0
// Whether this build's kernels can run on the current GPU: machine code for its
// architecture, or PTX the driver compiles for it (cmake/cuda_gencode.cmake). A GPU
// none fits (a build of sm_90a alone on an sm_100 card) would fail every launch with
// cudaErrorNoKernelImageForDevice; the backends refuse it in supports() instead, so
// `auto` falls back to another backend.
#pragma once

#include "nbhd/status.hpp"

namespace nbhd::cuda {

// Ok where no GPU is readable (the launch reports that), or where the current GPU
// can run this build's kernels; else unsupported, naming the backend, the GPU's
// compute capability and the build's architectures. Checked once per device.
Status check_kernel_image(const char* backend);

}  // namespace nbhd::cuda
