// SPDX-License-Identifier: Apache-2.0
// Host-side pieces the fused forward and backward share: what their 16-byte loads
// need of a tensor, the device check, and the key their plan caches use.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "cuda/common/kernel_image.hpp"
#include "cuda/common/check.hpp"
#include "cuda/common/tensor_map.hpp"
#include "cuda/fused/plan.hpp"
#include "nbhd/api.hpp"
#include "nbhd/problem.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd::cuda::fused {

// 16-byte loads and stores need aligned rows: base pointers on 16 bytes, every
// stride but the innermost a multiple of 16 bytes (8 halves, 4 floats), the
// innermost 1.
inline Status check_alignment(const char* what, const TensorRef& t) {
  if (!t.defined()) return Status::Ok();
  if (reinterpret_cast<uintptr_t>(t.data) % 16)
    return unsupported(std::string("backend fused needs ") + what + " to start on a 16-byte boundary");
  if (t.stride[t.ndim - 1] != 1)
    return unsupported(std::string("backend fused needs the last dimension of ") + what +
                       " to be contiguous (stride 1); call .contiguous() first");
  const int64_t vec = 16 / size_of(t.dtype);
  for (int i = 0; i < t.ndim - 1; ++i)
    if (t.stride[i] % vec)
      return unsupported(std::string("backend fused needs every stride of ") + what + " but the last to be a multiple of " +
                         std::to_string(vec) + " elements (16 bytes); got " + std::to_string(t.stride[i]) +
                         " in dimension " + std::to_string(i));
  return Status::Ok();
}

// A positive value of the current device, kept per device (devices 0-63; others read
// every time) after `read(device, &value)` gives it on the first call.
template <class Read>
Status once_per_device(std::array<std::atomic<int>, 64>& known, int* value, Read&& read) {
  int device = 0;
  NBHD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::atomic<int>* slot = device >= 0 && device < int(known.size()) ? &known[size_t(device)] : nullptr;
  if (const int v = slot ? slot->load(std::memory_order_relaxed) : 0; v > 0) {
    *value = v;
    return Status::Ok();
  }
  NBHD_RETURN_IF_ERROR(read(device, value));
  if (slot) slot->store(*value, std::memory_order_relaxed);
  return Status::Ok();
}

// The current device's compute capability. Attributes, not cudaGetDeviceProperties:
// its struct grows between CUDA releases, and a runtime newer than the headers wrote
// past it on the stack (crash under torch, H200).
// Read once per device (a call asks several times: supports, plan, launch), as
// 10 * major + minor.
inline Status current_capability(int* major, int* minor) {
  static std::array<std::atomic<int>, 64> known{};
  int cc = 0;
  NBHD_RETURN_IF_ERROR(once_per_device(known, &cc, [](int device, int* value) {
    int ma = 0, mi = 0;
    NBHD_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, device));
    NBHD_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, device));
    *value = 10 * ma + mi;
    return Status::Ok();
  }));
  *major = cc / 10;
  *minor = cc % 10;
  return Status::Ok();
}

// The current device's dynamic shared memory limit per block (the opt-in one), read
// once per device like the capability.
inline Status shared_memory_limit(int* bytes) {
  static std::array<std::atomic<int>, 64> known{};
  return once_per_device(known, bytes, [](int device, int* value) {
    NBHD_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return Status::Ok();
  });
}

// Compute capability 8.0 or newer (mma.sync m16n8k16, cp.async).
inline Status check_device() {
  int major = 0, minor = 0;
  NBHD_RETURN_IF_ERROR(current_capability(&major, &minor));
  if (major < 8)
    return unsupported("backend fused needs compute capability 8.0 or newer (mma.sync m16n8k16); this GPU is " +
                       std::to_string(major) + "." + std::to_string(minor));
  return check_kernel_image("fused");
}

// Whether the wgmma kernels can run here: the current device is sm_90 (H100, H200)
// and the build has them (sm_90a in NBHD_CUDA_ARCHS). NBHD_FUSED_NO_WGMMA=1 keeps
// the planner on the mma.sync kernels (to compare the two paths on one card).
// Checked per call: cheap attribute reads, and the current device can change.
inline bool hopper_device() {
  const char* off = std::getenv("NBHD_FUSED_NO_WGMMA");
  if (off && *off && *off != '0') return false;
  int major = 0, minor = 0;
  return wgmma_kernels_built() && current_capability(&major, &minor).ok() && major == 9 && minor == 0;
}

// A TMA producer's tensor maps: views[i] over tensors[i] into *maps[i]. "" or why
// TMA cannot address a tensor (named).
struct TmaMapRequest {
  const char* what;
  const TensorRef* tensor;
  const TmaView* view;
  CUtensorMap* map;
};
inline std::string encode_tensor_maps(DType dtype, std::initializer_list<TmaMapRequest> requests) {
  for (const TmaMapRequest& r : requests) {
    const Status s = encode_tensor_map(*r.view, r.tensor->data, dtype, r.map);
    if (!s.ok()) return std::string(r.what) + ": " + s.message();
  }
  return "";
}

// A query-side tensor (q, out, lse and their gradients: the query sub-box's tokens)
// as the kernels index it, by grid tokens: its base moved back by the offset of the
// box's first token. Only tokens inside the box are read or written, so every address
// stays in the tensor.
inline void* box_base(const TensorRef& t, const Problem& p) {
  if (!t.defined()) return t.data;
  int64_t offset = 0;
  for (int a = 0; a < p.rank; ++a) offset += p.query_begin[a] * t.stride[1 + a];
  return static_cast<char*>(t.data) - offset * int64_t(size_of(t.dtype));
}

// The query sub-box's tokens per padded axis, [begin, end) (the grid without one).
inline void query_ranges(const Problem& p, int* begin, int* end) {
  for (int a = 0; a < kMaxRank; ++a) {
    const Range r = p.padded_query_range(a);
    begin[a] = r.begin;
    end[a] = r.end;
  }
}

// The query tiles of boxes of 2^log2[a] group indices (the forward's, the dq pass's):
// over the query sub-box (tile_grid).
inline TileGrid query_tile_grid(const Problem& p, const int* log2) {
  int extent[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) extent[a] = p.padded_query_range(a).size();
  return tile_grid(p.neighborhood(), log2, extent);
}

// How the fused forward loads q, k and v for these tensors, and the backward's wgmma
// key pass Q and dO: "TMA", or "cp.async: " and why (plan.hpp, forward_tma_views and
// key_pass_tma_views; a base address TMA cannot take). backend.cu, backward.cu.
std::string forward_loads(const Problem& p, const ForwardTensors& t);
// The fused forward's configuration for p on the current device (NBHD_FUSED_TILE
// included): what the tests check a forced entry against. backend.cu.
TileConfig forward_config(const Problem& p);
// Whether a backward of p runs the halo dq pass (NBHD_FUSED_BACKWARD_DQ=halo and an
// entry that runs p: backward_plan.hpp, halo_dq_entry). backward.cu.
bool backward_dq_halo(const Problem& p);
// Whether a backward of p (asking for d rpb or not, deterministic or not) runs the
// halo key pass (NBHD_FUSED_BACKWARD_KEY=halo and an entry that runs it:
// halo_key_entry).
bool backward_key_halo(const Problem& p, bool d_rpb, bool deterministic);
std::string key_pass_loads(const Problem& p, const BackwardTensors& t);

// What a plan depends on: the grid geometry, the head dims and the dtype (which
// kernels and tile columns exist: float32 at head dim 128 has 32 columns, 16-bit
// 64), not batch or heads; as a map key.
using GeometryKey = std::array<int64_t, 19>;
inline GeometryKey geometry_key(const Problem& p) {
  GeometryKey key{p.rank, p.dim, p.value_dim(), int64_t(p.dtype)};
  for (int a = 0; a < p.rank; ++a) {
    key[4 + 5 * a] = p.extent[a];
    key[5 + 5 * a] = p.kernel[a];
    key[6 + 5 * a] = p.dilation[a];
    key[7 + 5 * a] = p.stride[a];
    key[8 + 5 * a] = p.causal[a];
  }
  return key;
}

// The index in an environment variable that forces a tile-table entry (for
// measuring entries); -1 when unset or not a number.
inline int forced_index(const char* variable) {
  const char* value = std::getenv(variable);
  return value && *value >= '0' && *value <= '9' ? std::atoi(value) : -1;
}

}  // namespace nbhd::cuda::fused
