// SPDX-License-Identifier: Apache-2.0
// The backends compiled into this build, best first (Backend::kAuto takes the first
// one that runs the problem on the tensors' device).
#include "dispatch/backend.hpp"

namespace nbhd::detail {

extern const BackendImpl kReferenceBackend;
extern const BackendImpl kCpuBackend;
#if NBHD_BACKEND_NAIVE
extern const BackendImpl kNaiveBackend;
#endif
#if NBHD_BACKEND_FUSED
extern const BackendImpl kFusedBackend;
#endif
#if NBHD_BACKEND_GEMM
extern const BackendImpl kGemmBackend;
#endif

const std::vector<const BackendImpl*>& registry() {
  static const std::vector<const BackendImpl*> backends = {
#if NBHD_BACKEND_FUSED
      &kFusedBackend,
#endif
#if NBHD_BACKEND_NAIVE
      &kNaiveBackend,
#endif
#if NBHD_BACKEND_GEMM
      &kGemmBackend,  // after naive until its GPU tests and benchmarks have run
#endif
      &kCpuBackend,
      &kReferenceBackend,
  };
  return backends;
}

}  // namespace nbhd::detail
