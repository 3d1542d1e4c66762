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
// each row's offset in the tile box (10 bits per axis, axis a at bit 10a: the packing
// of cuda/common/tile_shape.hpp's packed_token), for the loads.
__device__ __forceinline__ void key_tables(const Neighborhood& nb, const TileShape& shape,
                                           const detail::TokenLayout& layout, int64_t* delta, int* packed) {
  for (int n = threadIdx.x; n < kBlockK; n += kThreads) {
    int off[kMaxRank];
    shape.key_offset(n, off);
    int64_t d = 0;
    for (int a = 0; a < kMaxRank; ++a) d += int64_t(off[a]) * nb.axis[a].dilation * layout.axis[a];
    delta[n] = d;
    packed[n] = off[0] | (off[1] << 10) | (off[2] << 20);
  }
}

// Where a key tile's rows come from: a window tile (rows inside `limit` per axis of
// the tile box, at base + delta[n]) or additional tokens [m0, m1). A window tile of a
// key box that reaches past either end of a periodic axis's group (the box is
// unwrapped: tile_wraps) has no linear row offsets: each row's token wraps on its own
// (packed_token from the tile's unwrapped origin), at base + that token's offset.
struct KeySource {
  const void* base;  // window tile: the origin key's row (wraps: the row of token 0); additional: token m0's row
  int limit[kMaxRank];
  int extra_rows;      // additional tokens in this tile; -1 for a window tile
  bool wraps;          // window tile past a periodic axis's seam: rows by token
  int group[kMaxRank], origin[kMaxRank];  // wraps: the tile's dilation group and unwrapped origin
};

// A window tile at unwrapped `origin` of dilation group `group` of the tensor rows at
// `data` (batch b, head h): its base row, whether its rows wrap, and the limits of the
// key box `box`. kMayWrap false (a kernel instantiated for problems without periodic
// axes) compiles the wrapping path out.
template <bool kMayWrap, class T>
__device__ __forceinline__ KeySource window_source(const Neighborhood& nb, const TileShape& shape, const T* data,
                                                   const detail::TokenLayout& layout, int64_t b, int h,
                                                   const int* group, const int* origin, const Box& box) {
  KeySource src;
  const int extent[kMaxRank] = {shape.k(0), shape.k(1), shape.k(2)};
  src.wraps = kMayWrap && tile_wraps(nb, group, origin, extent);
  int token[kMaxRank] = {0, 0, 0};
  if (!src.wraps) token_of(nb, group, origin, token);  // the origin's row exists: the tile is not empty
  src.base = data + layout.offset(b, token, h);
  for (int a = 0; a < kMaxRank; ++a) {
    src.limit[a] = box.r[a].end - origin[a];
    src.group[a] = group[a];
    src.origin[a] = origin[a];
  }
  src.extra_rows = -1;
  return src;
}

// Loads `units` 16-byte columns (from column col0) of the kBlockK rows of a key tile
// into `dst` (row stride `stride` elements). `layout` is the tensor's the rows come
// from (window or additional tokens); `nb` serves tiles that wrap (src.wraps) only.
template <bool kMayWrap, class T>
__device__ __forceinline__ void load_key_tile(T* dst, int stride, const KeySource& src, const int64_t* delta,
                                              const int* packed, int col0, int units, int dim, int64_t inner, bool vec,
                                              const void* fallback, const Neighborhood& nb,
                                              const detail::TokenLayout& layout) {
  constexpr int kVec = 16 / int(sizeof(T));
  const T* base = static_cast<const T*>(src.base);
  if constexpr (kMayWrap) {
    if (src.wraps) {
#pragma unroll 1
      for (int idx = threadIdx.x; idx < kBlockK * units; idx += kThreads) {
        const int n = idx / units, u = idx - n * units;
        const int p = packed[n];
        const bool valid =
            (p & 1023) < src.limit[0] && ((p >> 10) & 1023) < src.limit[1] && (p >> 20) < src.limit[2];
        int64_t row = 0;
        if (valid) {
          int token[kMaxRank];
          packed_token(nb, src.group, src.origin, p, token);
          row = token[0] * layout.axis[0] + token[1] * layout.axis[1] + token[2] * layout.axis[2];
        }
        load_unit(dst + n * stride + u * kVec, base + row, col0 + u * kVec, dim, inner, vec, valid, fallback);
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < kBlockK * units; idx += kThreads) {
    const int n = idx / units, u = idx - n * units;
    bool valid;
    int64_t row;
    if (src.extra_rows < 0) {
      const int p = packed[n];
      valid = (p & 1023) < src.limit[0] && ((p >> 10) & 1023) < src.limit[1] && (p >> 20) < src.limit[2];
      row = delta[n];
    } else {
      valid = n < src.extra_rows;
      row = n * layout.axis[kMaxRank - 1];  // additional tokens [B, M, H, D]: rank 1
    }
    load_unit(dst + n * stride + u * kVec, valid ? base + row : base, col0 + u * kVec, dim, inner, vec, valid,
              fallback);
  }
}

}  // namespace nbhd::cuda::gemm
