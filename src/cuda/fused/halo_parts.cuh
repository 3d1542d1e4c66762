// SPDX-License-Identifier: Apache-2.0
// The halo kernels' parts (issue 20: small windows), shared by the forward
// (forward_halo_kernel.cuh) and the backward's dq and key passes
// (backward_halo_kernel.cuh): a tile's other side loaded once into shared memory (the
// halo: a query tile's key box, or a key tile's query box), each warp's columns as
// 8-column blocks along the innermost axis of the union of its own rows' ranges,
// read from the halo by per-lane ldmatrix row addresses, and the products over a step
// of blocks (Q K^T, dO V^T, K Q^T, V dO^T; P V, dS K, P^T dO, dS^T Q). mma.sync
// m16n8k16, 16-bit elements.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "core/layout.hpp"
#include "cuda/common/mma.cuh"
#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/tile_shape.hpp"
#include "cuda/fused/halo_layout.hpp"

namespace nbhd::cuda::fused::halo {

// Rows of kHeadDim 16-bit elements in 16-byte chunks; row r's chunk c sits at chunk
// c ^ swizzle(r), as in the tiled mma.sync kernels: the 8 consecutive rows one
// ldmatrix reads hit 8 different bank groups from any first row (rows are 64 or 128
// bytes).
template <int kHeadDim>
struct Rows {
  static_assert(kHeadDim == 32 || kHeadDim == 64, "the halo kernels' head-dim buckets are 32 and 64");
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kBytes = kChunks * 16;
  __device__ static constexpr int swizzle(int r) { return kChunks >= 8 ? (r & 7) : ((r >> 1) & 3); }
  __device__ static constexpr int chunk_index(int r, int c) { return r * kChunks + (c ^ swizzle(r)); }
};

// 8-key blocks per step (softmax, or P and dS): 32 keys, 16 scores per thread. (Steps
// of 8 blocks took 174 registers in the forward at head dim 32 with rpb, 216 at 64
// (ptxas, sm_90a), and spilled 150-280 bytes at 128.)
inline constexpr int kStepBlocks = 4;

// A tile of one dilation group and one (batch, head): a query tile (the forward, the
// dq pass) or a key tile (the key pass). Its group indices start at origin and its
// rows end at end (the group's queries, or its keys), its windows are the group's
// (lg). Its halo is the other side's box, stored row-major as `rows` halo rows: the
// union of a query tile's windows (its key box) or of a key tile's inverse windows
// (its query box), unwrapped on a periodic axis.
struct Tile {
  int64_t b;
  int h, hk;
  int group[kMaxRank], lg[kMaxRank], origin[kMaxRank], end[kMaxRank];
  Range halo[kMaxRank];
  int rows;
};

// The halo of a query tile whose other fields are set: its key box (shape.q: the
// tile's extents).
__device__ __forceinline__ void set_key_box(const Neighborhood& nb, const TileShape& shape, Tile& t) {
  t.rows = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int last = imin(t.origin[a] + shape.q(a), t.end[a]) - 1;
    t.halo[a] = {ax.window(t.origin[a], t.lg[a]).begin, ax.window(last, t.lg[a]).end};
    t.rows *= t.halo[a].size();
  }
}

// The tile's own rows of one tensor (Q or dO of a query tile, K or V of a key tile) at
// `head` into `dst`, rows past `end` and columns past `columns` as zeros (cp.async;
// the caller commits).
template <int kHeadDim, int kThreads, class T>
__device__ __forceinline__ void load_tile_rows(const Neighborhood& nb, const TileShape& shape, const Tile& t, const T* base,
                                               const detail::TokenLayout& layout, int head, int columns, int queries,
                                               T* dst) {
  using R = Rows<kHeadDim>;
  for (int idx = threadIdx.x; idx < queries * R::kChunks; idx += kThreads) {
    const int r = idx / R::kChunks, c = idx % R::kChunks;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * 8 < columns;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = t.origin[a] + off[a];
      valid &= j[a] < t.end[a];
    }
    const T* src = base;
    if (valid) {
      token_of(nb, t.group, t.lg, j, token);
      src = base + layout.offset(t.b, token, head) + c * 8;
    }
    ptx::cp_async_16(ptx::smem_address(&dst[R::chunk_index(r, c) * 8]), src, valid ? 16 : 0);
  }
}

// Two tensors of the halo at `head` (K and V of a query tile's key box; Q and dO of a
// key tile's query box): row r is the box's token r, row-major; on a periodic axis its
// token wraps. Each thread copies 16-byte column `chunk` of rows first_row, first_row +
// kRowStep, ..., its coordinates stepped without a division per row (two divisions per
// row made the loop ~290 SASS instructions). Columns past dim (k) or dim_v (v) are
// zeros, and so are the kHaloSlackRows rows past the halo: a masked pair's P is an
// exact 0, and 0 times these finite zeros adds nothing. cp.async; the caller commits.
template <int kHeadDim, int kThreads, class T>
__device__ __forceinline__ void load_halo(const Neighborhood& nb, const Tile& t, int head, const T* k,
                                          const detail::TokenLayout& kl, int dim, const T* v, const detail::TokenLayout& vl,
                                          int dim_v, T* k_dst, T* v_dst) {
  using R = Rows<kHeadDim>;
  constexpr int kRowStep = kThreads / R::kChunks;
  const int halo1 = t.halo[1].size(), halo2 = t.halo[2].size();
  const int chunk = threadIdx.x % R::kChunks, first_row = threadIdx.x / R::kChunks;
  const bool k_ok = chunk * 8 < dim, v_ok = chunk * 8 < dim_v;
  const T* k_head = k + t.b * kl.batch + head * kl.head + chunk * 8;
  const T* v_head = v + t.b * vl.batch + head * vl.head + chunk * 8;
  const int step01 = kRowStep / halo2, step2 = kRowStep - step01 * halo2;
  int x2 = first_row % halo2, x01 = first_row / halo2;
  int x1 = x01 % halo1, x0 = x01 / halo1;
  for (int r = first_row; r < t.rows; r += kRowStep) {
    const int j[kMaxRank] = {t.halo[0].begin + x0, t.halo[1].begin + x1, t.halo[2].begin + x2};
    int token[kMaxRank];
    token_of(nb, t.group, t.lg, j, token);
    const int at = R::chunk_index(r, chunk) * 8;
    const int64_t k_at = token[0] * kl.axis[0] + token[1] * kl.axis[1] + token[2] * kl.axis[2];
    const int64_t v_at = token[0] * vl.axis[0] + token[1] * vl.axis[1] + token[2] * vl.axis[2];
    ptx::cp_async_16(ptx::smem_address(&k_dst[at]), k_ok ? k_head + k_at : k, k_ok ? 16 : 0);
    ptx::cp_async_16(ptx::smem_address(&v_dst[at]), v_ok ? v_head + v_at : v, v_ok ? 16 : 0);
    x2 += step2;
    x1 += step01;
    if (x2 >= halo2) {
      x2 -= halo2;
      ++x1;
    }
    while (x1 >= halo1) {
      x1 -= halo1;
      ++x0;
    }
  }
  for (int idx = threadIdx.x; idx < kHaloSlackRows * R::kChunks; idx += kThreads) {
    const int at = (t.rows * R::kChunks + idx) * 8;
    *reinterpret_cast<uint4*>(&k_dst[at]) = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(&v_dst[at]) = make_uint4(0, 0, 0, 0);
  }
}

// A warp's key box walked as 8-key blocks: outer coordinates (y0, y1) and the block's
// first innermost coordinate x, relative to the warp's key box, and its first row in
// the halo. Row-major; x steps by 8 up to the box's padded width.
struct BlockWalk {
  int y0, y1, x, row;
  int width, extent1;        // padded innermost width (a multiple of 8), axis-1 extent
  int next_row1, next_row0;  // row steps at the end of an innermost run, of an axis-1 run
  __device__ void advance() {
    x += 8;
    row += 8;
    if (x < width) return;
    x = 0;
    row += next_row1;
    if (++y1 < extent1) return;
    y1 = 0;
    row += next_row0;
    ++y0;
  }
};

// A warp's 16 rows and their columns: the union of its rows' ranges (a box inside the
// tile's halo: a query's window, or a key's inverse window), walked in `blocks` 8-column
// blocks; per row g and g + 8 of the warp (mma C layout) its group indices, and per axis
// its range as a begin relative to the warp's box and a length (0 for a row past the
// tile's end; the innermost begin also relative to this thread's first column of a
// block, 2 t4); the rows' rpb offsets (the bias index is key - query + kernel - 1 per
// axis, so its sign along the columns is +1 for query rows and -1 for key rows).
struct WarpKeys {
  BlockWalk walk;
  int blocks;
  bool idle;  // every row of the warp is past the tile's end
  int row_j[2][kMaxRank], win_lo[2][kMaxRank], win_len[2][kMaxRank];
  bool row_valid[2];
  int rpb_sign;
  int64_t rpb_row[2];  // the bias of column (y0, y1, x) for row i: rpb_row[i] + sign (y0 a0 + y1 a1 + x a2)
};

// range_of(a, j): row j's range on axis a (Axis::window for a query row; the clipped
// inverse window for a key row); ranges' begins and ends never decrease along an
// axis, so a box of rows has the union of its first and last row's.
template <class RangeOf>
__device__ __forceinline__ WarpKeys warp_keys(const Neighborhood& nb, const TileShape& shape, const Tile& t,
                                              const detail::RpbLayout& rpb, int rpb_head, int rpb_sign, int warp, int lane,
                                              RangeOf&& range_of) {
  const int g = lane >> 2, t4 = lane & 3;
  WarpKeys w;
  int warp_off[kMaxRank];
  shape.warp_offset(warp, warp_off);
  Range box[kMaxRank];
  w.idle = false;
  for (int a = 0; a < kMaxRank; ++a) {
    const int first = t.origin[a] + warp_off[a], last = imin(first + shape.w(a), t.end[a]) - 1;
    w.idle |= last < first;
    // Inside the tile's halo: a key's inverse window clipped to the computed queries
    // may be empty at a begin past the halo's end.
    const int begin = imax(range_of(a, first).begin, t.halo[a].begin);
    box[a] = {begin, imax(begin, imin(range_of(a, imax(last, first)).end, t.halo[a].end))};
  }
  w.rpb_sign = rpb_sign;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int off[kMaxRank];
    shape.query_offset(warp * 16 + g + 8 * i, off);
    w.row_valid[i] = true;
    for (int a = 0; a < kMaxRank; ++a) {
      w.row_j[i][a] = t.origin[a] + off[a];
      w.row_valid[i] &= w.row_j[i][a] < t.end[a];
    }
    w.rpb_row[i] = int64_t(rpb_head) * rpb.head + rpb_sign * int64_t(2 * t4) * rpb.axis[kMaxRank - 1];
    for (int a = 0; a < kMaxRank; ++a) {
      const Range win = range_of(a, w.row_j[i][a]);
      w.win_lo[i][a] = win.begin - box[a].begin - (a == kMaxRank - 1 ? 2 * t4 : 0);
      w.win_len[i][a] = w.row_valid[i] ? win.size() : 0;
      w.rpb_row[i] += (rpb_sign * int64_t(box[a].begin - w.row_j[i][a]) + nb.axis[a].kernel - 1) * rpb.axis[a];
    }
  }
  const int halo1 = t.halo[1].size(), halo2 = t.halo[2].size();
  w.walk.width = (box[2].size() + 7) & ~7;
  w.walk.extent1 = box[1].size();
  w.walk.next_row1 = halo2 - w.walk.width;
  w.walk.next_row0 = (halo1 - w.walk.extent1) * halo2;
  w.walk.y0 = w.walk.y1 = w.walk.x = 0;
  w.walk.row = ((box[0].begin - t.halo[0].begin) * halo1 + (box[1].begin - t.halo[1].begin)) * halo2 +
               (box[2].begin - t.halo[2].begin);
  w.blocks = box[0].size() * w.walk.extent1 * (w.walk.width / 8);
  return w;
}

// The next kStepBlocks blocks of the walk (from block `first`): their first halo rows
// (a block past the warp's keys reads the first block's rows and is masked whole:
// every step computes kStepBlocks blocks, without branches), and which of this
// thread's scores its queries attend: bit 4j + 2i + e for row i, column 2 t4 + e of
// block j.
__device__ __forceinline__ uint32_t step_blocks(WarpKeys& w, int first, int (&block_row)[kStepBlocks]) {
  uint32_t attended = 0;
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    const bool on = j == 0 || first + j < w.blocks;
    block_row[j] = on ? w.walk.row : block_row[0];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool outer = on && unsigned(w.walk.y0 - w.win_lo[i][0]) < unsigned(w.win_len[i][0]) &&
                         unsigned(w.walk.y1 - w.win_lo[i][1]) < unsigned(w.win_len[i][1]);
#pragma unroll
      for (int e = 0; e < 2; ++e)
        attended |= uint32_t(outer && unsigned(w.walk.x + e - w.win_lo[i][2]) < unsigned(w.win_len[i][2]))
                    << (4 * j + 2 * i + e);
    }
    w.walk.advance();
  }
  return attended;
}

// s = A B^T over the step's blocks, B's rows from the halo at `rows` (K for S = Q K^T,
// V for dP = dO V^T), A's fragments given (the warp's 16 rows, whole head dim). Two
// blocks per ldmatrix: lanes 0-15 address the first block's 8 rows (two chunks), lanes
// 16-31 the second's.
template <int kHeadDim, class T>
__device__ __forceinline__ void block_scores(float (&s)[kStepBlocks][4], const typename Mma<T>::A (&a)[kHeadDim / 16],
                                             uint32_t rows, const int (&block_row)[kStepBlocks], int lane) {
  using R = Rows<kHeadDim>;
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
  for (int pair = 0; pair < kStepBlocks / 2; ++pair) {
    const int row = (lane < 16 ? block_row[2 * pair] : block_row[2 * pair + 1]) + (lane & 7);
    const uint32_t lane_row = rows + row * R::kBytes;
    const int swz = R::swizzle(row);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      typename Mma<T>::B b0, b1;
      Mma<T>::load_b_nk(lane_row + (((2 * kk + ((lane >> 3) & 1)) ^ swz) << 4), b0, b1);
      Mma<T>::mma(s[2 * pair], a[kk], b0);
      Mma<T>::mma(s[2 * pair + 1], a[kk], b1);
    }
  }
}

// acc += P B over the step's blocks, P (or dS) from registers (two blocks' C layout is
// k16's A layout), B's rows from the halo at `rows` (V for O, K for dQ) by
// ldmatrix.trans: lanes 0-7 and 16-23 the first block's rows, 8-15 and 24-31 the
// second's.
template <int kHeadDim, class T>
__device__ __forceinline__ void block_accumulate(float (&acc)[kHeadDim / 8][4], const float (&p)[kStepBlocks][4],
                                                 uint32_t rows, const int (&block_row)[kStepBlocks], int lane) {
  using R = Rows<kHeadDim>;
#pragma unroll
  for (int kb = 0; kb < kStepBlocks / 2; ++kb) {
    uint32_t a[4];
    a[0] = ptx::pack2<T>(p[2 * kb][0], p[2 * kb][1]);
    a[1] = ptx::pack2<T>(p[2 * kb][2], p[2 * kb][3]);
    a[2] = ptx::pack2<T>(p[2 * kb + 1][0], p[2 * kb + 1][1]);
    a[3] = ptx::pack2<T>(p[2 * kb + 1][2], p[2 * kb + 1][3]);
    const int row = (((lane >> 3) & 1) ? block_row[2 * kb + 1] : block_row[2 * kb]) + (lane & 7);
    const uint32_t lane_row = rows + row * R::kBytes;
    const int swz = R::swizzle(row);
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, lane_row + (((2 * dp + (lane >> 4)) ^ swz) << 4));
      ptx::mma_16816<T>(acc[2 * dp], a, b);
      ptx::mma_16816<T>(acc[2 * dp + 1], a, b + 2);
    }
  }
}

// Calls f(j, e, offset) for every attended score (block j, element e) of the step,
// with its bias offset in layout `rl` (warp_keys' rpb_row and sign): the step's blocks
// walked again from `at` (their coordinates are not kept, for registers).
template <class F>
__device__ __forceinline__ void for_each_bias(uint32_t attended, const detail::RpbLayout& rl, const WarpKeys& w,
                                              BlockWalk at, F&& f) {
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    const int64_t block_at = int64_t(at.y0) * rl.axis[0] + int64_t(at.y1) * rl.axis[1] + int64_t(at.x) * rl.axis[2];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (((attended >> (4 * j + e)) & 1u) == 0) continue;
      f(j, e, w.rpb_row[e >> 1] + w.rpb_sign * (block_at + ((e & 1) ? rl.axis[2] : 0)));
    }
    at.advance();
  }
}

// The scores of the step to base-2 units (times scale_log2), the unattended ones -inf,
// plus, with a bias, bias(offset) in natural units (for_each_bias).
template <class Bias>
__device__ __forceinline__ void scale_mask_bias(float (&s)[kStepBlocks][4], uint32_t attended, float scale_log2,
                                                bool has_bias, const detail::RpbLayout& rl, const WarpKeys& w,
                                                const BlockWalk& at, Bias&& bias) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = (attended >> (4 * j + e)) & 1u ? s[j][e] * scale_log2 : kNegInf;
  if (has_bias) for_each_bias(attended, rl, w, at, [&](int j, int e, int64_t o) { s[j][e] += bias(o) * kLog2e; });
}

// The bias of an rpb tensor in global memory (float32 or the inputs' dtype).
template <class T>
struct GlobalBias {
  const void* rpb;
  bool is_float32;
  __device__ float operator()(int64_t o) const {
    return is_float32 ? __ldg(static_cast<const float*>(rpb) + o) : to_float(static_cast<const T*>(rpb)[o]);
  }
};

// The A fragments of the warp's 16 rows of a query-row tensor in shared memory (Q or
// dO), whole head dim.
template <int kHeadDim, class T>
__device__ __forceinline__ void load_row_fragments(typename Mma<T>::A (&a)[kHeadDim / 16], const T* rows, int warp,
                                                   int lane) {
  using R = Rows<kHeadDim>;
  const uint32_t lane_row = ptx::smem_address(rows) + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * R::kBytes;
  const int swz = R::swizzle(lane & 7);  // rows 16 warp + lane % 8 (+ 8): the same low bits
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) a[kk] = Mma<T>::load_a(lane_row + (((2 * kk + (lane >> 4)) ^ swz) << 4));
}

// The warp's 16 output rows (acc times `row_scale` per row) to `out` at `head`, columns
// below `columns`, staged through the warp's rows of `stage` (16-byte stores).
template <int kHeadDim, class T>
__device__ __forceinline__ void store_rows(const float (&acc)[kHeadDim / 8][4], const float (&row_scale)[2], T* stage,
                                           const Neighborhood& nb, const TileShape& shape, const Tile& t, T* out,
                                           const detail::TokenLayout& layout, int head, int columns, int warp, int lane) {
  using R = Rows<kHeadDim>;
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int d = 0; d < kHeadDim / 8; ++d)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      T* dst = &stage[R::chunk_index(warp * 16 + g + 8 * i, d) * 8 + 2 * t4];
      dst[0] = from_float<T>(acc[d][2 * i] * row_scale[i]);
      dst[1] = from_float<T>(acc[d][2 * i + 1] * row_scale[i]);
    }
  __syncwarp();
  for (int idx = lane; idx < 16 * R::kChunks; idx += 32) {
    const int r = warp * 16 + idx / R::kChunks, c = idx % R::kChunks;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * 8 < columns;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = t.origin[a] + off[a];
      valid &= j[a] < t.end[a];
    }
    if (!valid) continue;
    token_of(nb, t.group, t.lg, j, token);
    *reinterpret_cast<uint4*>(out + layout.offset(t.b, token, head) + c * 8) =
        *reinterpret_cast<const uint4*>(&stage[R::chunk_index(r, c) * 8]);
  }
}

}  // namespace nbhd::cuda::fused::halo
