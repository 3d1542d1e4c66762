// SPDX-License-Identifier: Apache-2.0
// Kernel parameters from TensorRefs, shared-memory sizing, and the typed launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/layout.hpp"
#include "cuda/common/kernel_image.hpp"
#include "cuda/common/check.hpp"
#include "cuda/gemm/kernels.hpp"
#include "cuda/gemm/ops.hpp"

namespace nbhd::cuda::gemm {
namespace {

bool dtype_built(DType t) {
  switch (t) {
    case DType::kFloat16:
      return NBHD_GEMM_FLOAT16;
    case DType::kBFloat16:
      return NBHD_GEMM_BFLOAT16;
    case DType::kFloat32:
      return NBHD_GEMM_FLOAT32;
    default:
      return false;
  }
}

// Rows that start on 16 bytes: aligned base, unit inner stride, every outer stride a
// multiple of 16 bytes (dimensions of size 1 never move the pointer). Whether the
// rows' length allows whole vectors is the caller's business.
bool aligned_rows(const TensorRef& t) {
  if (!t.defined() || t.ndim == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  const int last = t.ndim - 1;
  if (t.shape[last] > 1 && t.stride[last] != 1) return false;
  const int64_t per_16_bytes = 16 / size_of(t.dtype);
  for (int i = 0; i < last; ++i)
    if (t.shape[i] > 1 && t.stride[i] % per_16_bytes != 0) return false;
  return true;
}

int last_dim(const TensorRef& t) { return int(t.shape[t.ndim - 1]); }

bool whole_vectors(const TensorRef& t) {
  return !t.defined() || (aligned_rows(t) && last_dim(t) % (16 / size_of(t.dtype)) == 0);
}

Operand operand(const TensorRef& t, int rank) {
  Operand o{};
  o.data = t.data;
  o.layout = detail::token_layout(t, rank);
  o.vec = whole_vectors(t);
  return o;
}

QueryGrid query_grid(const Problem& p, const TileShape& s) {
  QueryGrid g{};
  g.nb = p.neighborhood();
  g.shape = s;
  const TileGrid tiles = tile_grid(g.nb, s.q_log2);
  std::copy(tiles.per_group, tiles.per_group + kMaxRank, g.tiles_per_group);
  g.tiles = tiles.count;
  g.heads = int(p.heads);
  g.heads_per_kv = int(p.heads_per_kv());
  return g;
}

// Calls f(T{}, A{}) with the problem's element type T and the weights' type A
// (float32: the workspace; T: the public operations) when this build has them.
template <class F>
Status dispatch(DType problem, DType weights, F&& f) {
  switch (problem) {
#if NBHD_GEMM_FLOAT16
    case DType::kFloat16:
      if (weights == DType::kFloat32) return f(__half{}, float{});
      if (weights == DType::kFloat16) return f(__half{}, __half{});
      break;
#endif
#if NBHD_GEMM_BFLOAT16
    case DType::kBFloat16:
      if (weights == DType::kFloat32) return f(__nv_bfloat16{}, float{});
      if (weights == DType::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
      break;
#endif
#if NBHD_GEMM_FLOAT32
    case DType::kFloat32:
      if (weights == DType::kFloat32) return f(float{}, float{});
      break;
#endif
    default:
      break;
  }
  return unsupported(std::string("backend gemm has no kernel for ") + name(problem) + " with " + name(weights) +
                     " attention weights in this build (NBHD_DTYPES)");
}

// Slab capacity of a kernel at the two-CTAs-per-SM budget, or at the opt-in maximum
// when that leaves fewer than kMinSlabSlots slots per row. NBHD_GEMM_SLAB_SLOTS=<n>
// caps it (the tests send small problems through several slabs with it).
template <class Capacity>
int capacity_for(const SmemLimits& limits, Capacity&& capacity) {
  int c = capacity(limits.two_per_sm());
  if (c < kMinSlabSlots) c = capacity(limits.per_block_optin);
  if (const char* cap = std::getenv("NBHD_GEMM_SLAB_SLOTS"); cap && std::atoi(cap) > 0) c = std::min(c, std::atoi(cap));
  return c;
}

}  // namespace

Status check_grids(const Problem& p, const Plan& plan) {
  // PN and NN: a block per query tile and head; IN: per key tile and kv head; NN and
  // IN split the head dim into kCols-column chunks along y.
  const Neighborhood nb = p.neighborhood();
  const int64_t chunks = (std::max(p.dim, p.value_dim()) + kCols - 1) / kCols;
  NBHD_RETURN_IF_ERROR(check_grid("backend gemm's PN and NN kernels",
                                  tile_grid(nb, plan.query.shape.q_log2).count * p.heads * p.batch, chunks));
  return check_grid("backend gemm's IN kernel", tile_grid(nb, plan.inverse.shape.k_log2).count * p.kv_heads * p.batch,
                    chunks);
}

Status device_limits(SmemLimits* limits) {
  int device = 0;
  NBHD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  struct Entry {
    bool known = false;
    int major = 0;
    SmemLimits limits{};
  };
  static std::mutex mutex;
  static Entry entries[64];
  Entry e;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (device >= 0 && device < 64) e = entries[device];
  }
  if (!e.known) {
    NBHD_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&e.major, cudaDevAttrComputeCapabilityMajor, device));
    NBHD_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&e.limits.per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    NBHD_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&e.limits.per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    e.known = true;
    std::lock_guard<std::mutex> lock(mutex);
    if (device >= 0 && device < 64) entries[device] = e;
  }
  if (e.major < 8)
    return unsupported(
        "backend gemm needs compute capability 8.0 or newer (mma.sync for bfloat16 and tf32, "
        "cp.async); this GPU is " +
        std::to_string(e.major) + ".x");
  *limits = e.limits;
  return check_kernel_image("gemm");
}

Status check_problem(const Problem& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat32)
    return unsupported(std::string("dtype ") + name(p.dtype) +
                       " is not supported on CUDA (use float16, bfloat16 or float32)");
  if (!dtype_built(p.dtype))
    return unsupported(std::string("backend gemm has no ") + name(p.dtype) + " kernels in this build (NBHD_DTYPES)");
  if (std::max(p.dim, p.value_dim()) > kMaxDim)
    return unsupported("max(dim, dim_v) = " + std::to_string(std::max(p.dim, p.value_dim())) +
                       " exceeds 256, the head dims backend gemm keeps in shared memory (use naive)");
  const int64_t slots = p.window_size() + p.additional_tokens;
  if (slots > INT_MAX - 64)
    return unsupported("window size + additional tokens = " + std::to_string(slots) +
                       " exceeds what backend gemm indexes in 32 bits");
  // Key codes (group index * slot stride summed over axes) are 32-bit. On a periodic
  // axis the indices are unwrapped: up to a kernel past either end of the group.
  const Neighborhood nb = p.neighborhood();
  int64_t code = 0;
  for (int a = 0; a < kMaxRank; ++a)
    code += int64_t(nb.axis[a].length + (nb.axis[a].periodic ? nb.axis[a].kernel : 0)) * slot_stride(nb, a);
  if (code > INT_MAX)
    return unsupported("extents x window sizes overflow backend gemm's 32-bit slot arithmetic (use naive)");
  return Status::Ok();
}

Status pn_slab_plan(const Problem& p, int dim, DType weights, SlabPlan* plan) {
  SmemLimits limits;
  NBHD_RETURN_IF_ERROR(device_limits(&limits));
  const int dim_pad = round_up(dim, 16), elem = size_of(p.dtype), unit = 16 / size_of(weights);
  if (dim_pad > kMaxDim) return unsupported("backend gemm: head dim " + std::to_string(dim) + " exceeds 256");
  const int capacity = capacity_for(limits, [&](int budget) { return pn_capacity(budget, dim_pad, elem, unit); });
  if (capacity < 1)
    return unsupported("backend gemm: the PN kernel's tiles of head dim " + std::to_string(dim) +
                       " do not fit in this GPU's shared memory");
  *plan = plan_slabs(p.neighborhood(), int(p.additional_tokens), capacity);
  return Status::Ok();
}

Status pn(const Problem& p, const Plan& plan, const PnArgs& a, cudaStream_t stream, bool* epilogue_done) {
  PnParams k{};
  k.grid = query_grid(p, plan.query.shape);
  const int elem = size_of(p.dtype), unit = 16 / size_of(a.out.dtype);
  k.dim = last_dim(a.x);
  k.dim_pad = round_up(k.dim, 16);
  NBHD_RETURN_IF_ERROR(pn_slab_plan(p, k.dim, a.out.dtype, &k.slabs));
  k.smem = pn_smem(k.dim_pad, k.slabs.slots, unit, elem);
  k.window = int(p.window_size());
  k.extra = int(p.additional_tokens);
  k.alpha = a.alpha;
  k.masked = a.masked;
  k.epilogue = k.slabs.whole_row() ? a.epilogue : Epilogue::kStore;
  *epilogue_done = k.slabs.whole_row() || a.epilogue == Epilogue::kStore;
  k.x = operand(a.x, p.rank);
  k.y = operand(a.y, p.rank);
  k.y_extra = operand(a.y_extra, 1);
  k.rpb = a.rpb.data;
  k.rpb_layout = detail::rpb_layout(a.rpb, p.rank);
  k.rpb_float32 = a.rpb.defined() && a.rpb.dtype == DType::kFloat32;
  k.out = a.out.data;
  k.out_layout = detail::token_layout(a.out, p.rank);
  k.out_vec = aligned_rows(a.out);
  k.out_capacity = int(std::min<int64_t>(std::max(a.out_capacity, p.window_size() + p.additional_tokens), INT_MAX));
  k.probs = a.probs.data;
  if (k.epilogue == Epilogue::kSoftmaxBackward) {
    const detail::TokenLayout pl = detail::token_layout(a.probs, p.rank);
    bool same = a.probs.dtype == a.out.dtype && pl.batch == k.out_layout.batch && pl.head == k.out_layout.head &&
                pl.inner == k.out_layout.inner;
    for (int i = 0; i < kMaxRank; ++i) same = same && pl.axis[i] == k.out_layout.axis[i];
    if (!same) return Status(StatusCode::kInternal, "gemm pn: probabilities and gradients differ in layout");
  }
  k.lse = static_cast<float*>(a.lse.data);
  k.lse_layout = detail::token_layout(a.lse, p.rank, /*has_inner=*/false);
  const int64_t blocks = k.grid.tiles * p.heads * p.batch;
  NBHD_RETURN_IF_ERROR(check_grid("backend gemm's PN kernel", blocks));
  return dispatch(p.dtype, a.out.dtype, [&](auto t, auto w) -> Status {
    return cuda_status(launch_pn<decltype(t), decltype(w)>(k, blocks, stream), "gemm pn kernel");
  });
}

Status nn(const Problem& p, const Plan& plan, const NnArgs& a, cudaStream_t stream) {
  SmemLimits limits;
  NBHD_RETURN_IF_ERROR(device_limits(&limits));
  NnParams k{};
  k.grid = query_grid(p, plan.query.shape);
  const int elem = size_of(p.dtype), weight_elem = size_of(a.weights.dtype), unit = 16 / weight_elem;
  k.dim = last_dim(a.out);
  const int capacity = capacity_for(limits, [&](int budget) { return nn_capacity(budget, elem, weight_elem, unit); });
  if (capacity < 1) return unsupported("backend gemm: the NN kernel's tiles do not fit in this GPU's shared memory");
  k.slabs = plan_slabs(k.grid.nb, int(p.additional_tokens), capacity);
  k.smem = nn_smem(k.slabs.slots, unit, elem, weight_elem);
  k.window = int(p.window_size());
  k.extra = int(p.additional_tokens);
  k.weight_capacity = int(std::min<int64_t>(a.weight_capacity, INT_MAX));
  k.alpha = a.alpha;
  k.weights = a.weights.data;
  k.w_layout = detail::token_layout(a.weights, p.rank);
  k.w_vec = aligned_rows(a.weights);
  k.y = operand(a.y, p.rank);
  k.y_extra = operand(a.y_extra, 1);
  k.out = a.out.data;
  k.out_layout = detail::token_layout(a.out, p.rank);
  k.out_vec = whole_vectors(a.out);
  const int64_t blocks = k.grid.tiles * p.heads * p.batch;
  const int64_t chunks = ceil_div(k.dim, kCols);
  NBHD_RETURN_IF_ERROR(check_grid("backend gemm's NN kernel", blocks, chunks));
  return dispatch(p.dtype, a.weights.dtype, [&](auto t, auto w) -> Status {
    return cuda_status(launch_nn<decltype(t), decltype(w)>(k, blocks, int(chunks), stream), "gemm nn kernel");
  });
}

Status in(const Problem& p, const Plan& plan, const InArgs& a, cudaStream_t stream) {
  SmemLimits limits;
  NBHD_RETURN_IF_ERROR(device_limits(&limits));
  InParams k{};
  k.nb = p.neighborhood();
  k.shape = plan.inverse.shape;
  const TileGrid tiles = tile_grid(k.nb, k.shape.k_log2);
  std::copy(tiles.per_group, tiles.per_group + kMaxRank, k.tiles_per_group);
  k.tiles = tiles.count;
  k.kv_heads = int(p.kv_heads);
  k.heads_per_kv = int(p.heads_per_kv());
  k.dim = last_dim(a.out);
  k.smem = in_smem(size_of(p.dtype));
  k.alpha = a.alpha;
  k.weights = a.weights.data;
  k.w_layout = detail::token_layout(a.weights, p.rank);
  k.x = operand(a.x, p.rank);
  k.out = a.out.data;
  k.out_layout = detail::token_layout(a.out, p.rank);
  k.out_vec = whole_vectors(a.out);
  const int64_t blocks = k.tiles * p.kv_heads * p.batch;
  const int64_t chunks = ceil_div(k.dim, kCols);
  NBHD_RETURN_IF_ERROR(check_grid("backend gemm's IN kernel", blocks, chunks));
  return dispatch(p.dtype, a.weights.dtype, [&](auto t, auto w) -> Status {
    return cuda_status(launch_in<decltype(t), decltype(w)>(k, blocks, int(chunks), stream), "gemm in kernel");
  });
}

}  // namespace nbhd::cuda::gemm
