// SPDX-License-Identifier: Apache-2.0
// Device helpers shared by the gemm kernels: per-warp chunk activity (a ballot over
// geometry.hpp's chunk_active), and the 16-byte (or element-wise) copies between
// global rows and shared-memory tiles.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/gemm/geometry.hpp"
#include "cuda/common/mma.cuh"
#include "cuda/gemm/params.hpp"

namespace nbhd::cuda::gemm {

// Bit j: chunk j of the key tile at `origin` has a key inside `box` (the union of a
// warp's windows through the slab). Every lane of the warp must call it.
__device__ __forceinline__ uint32_t window_chunks(const TileShape& shape, const int* origin, const Box& box, bool idle,
                                                  int lane) {
  return __ballot_sync(0xffffffffu, !idle && lane < kBlockK / kChunkKeys && chunk_active(shape, origin, box, lane));
}

// Same for a tile of additional tokens starting at token m0, of which [., m1) exist.
__device__ __forceinline__ uint32_t extra_chunks(int m0, int m1, bool idle, int lane) {
  return __ballot_sync(0xffffffffu, !idle && lane < kBlockK / kChunkKeys && m0 + lane * kChunkKeys < m1);
}

// ---- copies between global rows and shared tiles

// kVec elements of a row from column `col` (elements past `dim`, or of an invalid
// row, are zeros). The vector path needs dim % kVec == 0 (host-checked with the
// alignment); `fallback` is any valid address, used when nothing is read.
template <class T>
__device__ __forceinline__ void load_unit(T* dst, const T* row, int col, int dim, int64_t inner, bool vec, bool valid,
                                          const void* fallback) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (vec) {
    const bool ok = valid && col < dim;
    ptx::cp_async_16(ptx::smem_address(dst), ok ? static_cast<const void*>(row + col) : fallback, ok ? 16 : 0);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[e] = valid && col + e < dim ? row[(col + e) * inner] : from_float<T>(0.f);
  }
}

// kVec elements of a shared row to a global row from column `col` (columns past
// `dim` are not written).
template <class T>
__device__ __forceinline__ void store_unit(T* row, const T* src, int col, int dim, int64_t inner, bool vec) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (vec && col + kVec <= dim) {
    *reinterpret_cast<uint4*>(row + col) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (col + e < dim) row[(col + e) * inner] = src[e];
  }
}

// Per-key-row offsets of a key tile in a tensor (from the tile origin's row), and
// each row's offset in the tile box (8 bits per axis), for the loads.
__device__ __forceinline__ void key_tables(const Neighborhood& nb, const TileShape& shape,
                                           const detail::TokenLayout& layout, int64_t* delta, int* packed) {
  for (int n = threadIdx.x; n < kBlockK; n += kThreads) {
    int off[kMaxRank];
    shape.key_offset(n, off);
    int64_t d = 0;
    for (int a = 0; a < kMaxRank; ++a) d += int64_t(off[a]) * nb.axis[a].dilation * layout.axis[a];
    delta[n] = d;
    packed[n] = off[0] | (off[1] << 8) | (off[2] << 16);
  }
}

// Where a key tile's rows come from: a window tile (rows inside `limit` per axis of
// the tile box, at base + delta[n]) or additional tokens [m0, m1).
struct KeySource {
  const void* base;  // window tile: the origin key's row; additional: token m0's row
  int limit[kMaxRank];
  int64_t extra_step;  // additional tokens: elements between consecutive tokens
  int extra_rows;      // additional tokens in this tile; -1 for a window tile
};

// Loads `units` 16-byte columns (from column col0) of the kBlockK rows of a key tile
// into `dst` (row stride `stride` elements).
template <class T>
__device__ __forceinline__ void load_key_tile(T* dst, int stride, const KeySource& src, const int64_t* delta,
                                              const int* packed, int col0, int units, int dim, int64_t inner, bool vec,
                                              const void* fallback) {
  constexpr int kVec = 16 / int(sizeof(T));
  const T* base = static_cast<const T*>(src.base);
  for (int idx = threadIdx.x; idx < kBlockK * units; idx += kThreads) {
    const int n = idx / units, u = idx - n * units;
    bool valid;
    int64_t row;
    if (src.extra_rows < 0) {
      const int p = packed[n];
      valid = (p & 255) < src.limit[0] && ((p >> 8) & 255) < src.limit[1] && (p >> 16) < src.limit[2];
      row = delta[n];
    } else {
      valid = n < src.extra_rows;
      row = n * src.extra_step;
    }
    load_unit(dst + n * stride + u * kVec, valid ? base + row : base, col0 + u * kVec, dim, inner, vec, valid,
              fallback);
  }
}

}  // namespace nbhd::cuda::gemm
