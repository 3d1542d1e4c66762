// SPDX-License-Identifier: Apache-2.0
// The fused backward's entry points for backend.cu, and its compiled launchers
// (one per dtype and head-dim bucket, instantiated by generated translation units).
#pragma once

#include <cuda_runtime.h>

#include "cuda/fused/backward_params.hpp"
#include "nbhd/api.hpp"

namespace nbhd::cuda::fused {

// Runs every pass of the backward (backward_kernel.cuh) for filled-in params.
template <class T, int kHeadDim>
cudaError_t launch_fused_backward(const BackwardParams& p, cudaStream_t stream);

// What the backward needs beyond the forward's checks (supports() in backend.cu).
Status backward_supports(const Problem& p);

Status backward(const Problem& p, const BackwardTensors& t, const Options& o);

}  // namespace nbhd::cuda::fused
