// SPDX-License-Identifier: Apache-2.0
// Typed launchers of the gemm kernels (pn.cu, nn.cu, in.cu), one instantiation per
// (element type T, weight type A) pair of the built dtypes: A = float for the
// workspace of forward/backward, A = T for the public unfused operations.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/shared_memory.hpp"
#include "cuda/gemm/params.hpp"

namespace nbhd::cuda::gemm {

template <class T, class A>
cudaError_t launch_pn(const PnParams& p, int64_t blocks, cudaStream_t stream);
template <class T, class A>
cudaError_t launch_nn(const NnParams& p, int64_t blocks, int column_chunks, cudaStream_t stream);
template <class T, class A>
cudaError_t launch_in(const InParams& p, int64_t blocks, int column_chunks, cudaStream_t stream);

// The dtypes this build has kernels for (NBHD_DTYPES, set by CMakeLists.txt), and
// helpers that keep an instantiation only when its dtype is built.
#ifndef NBHD_GEMM_FLOAT16
#define NBHD_GEMM_FLOAT16 0
#endif
#ifndef NBHD_GEMM_BFLOAT16
#define NBHD_GEMM_BFLOAT16 0
#endif
#ifndef NBHD_GEMM_FLOAT32
#define NBHD_GEMM_FLOAT32 0
#endif
#if NBHD_GEMM_FLOAT16
#define NBHD_GEMM_IF_FLOAT16(x) x
#else
#define NBHD_GEMM_IF_FLOAT16(x)
#endif
#if NBHD_GEMM_BFLOAT16
#define NBHD_GEMM_IF_BFLOAT16(x) x
#else
#define NBHD_GEMM_IF_BFLOAT16(x)
#endif
#if NBHD_GEMM_FLOAT32
#define NBHD_GEMM_IF_FLOAT32(x) x
#else
#define NBHD_GEMM_IF_FLOAT32(x)
#endif

}  // namespace nbhd::cuda::gemm
