// SPDX-License-Identifier: Apache-2.0
// Fused forward for small windows (issue 20: NAT, DiNAT, StyleNAT; windows up to ~13
// per axis, head dims up to 64), mma.sync (sm_80+), 16-bit.
//
// The tiled kernel (forward_kernel.cuh) walks a CTA's key box in key tiles and, per
// tile and warp, loads, decides and masks: on NAT's 56² grid with 7x7 windows at head
// dim 32 it executes ~5,500 warp instructions per 16 queries for their 784 attended
// pairs, at half the issue slots (ncu, H100; docs/performance.md, "Small windows").
// Here a CTA loads its query tile and the tile's halo (the union of its queries'
// windows: the key box, at most q + kernel + stride - 2 keys per axis) into shared
// memory once, behind one barrier, and each warp then computes its 16 queries against
// the union of its own windows only, read from the halo through per-lane ldmatrix row
// addresses: no key tiles, stages or per-tile decisions. A warp walks its keys as 8-key
// blocks along the innermost axis (a block's outer coordinates are fixed; a row of the
// warp's key box is padded to whole blocks), kStepBlocks blocks per online-softmax
// step, so that the mask is one unsigned compare per row and outer axis per block and
// one per score on the innermost axis.
#pragma once

#include "cuda/fused/forward_kernel.cuh"
#include "cuda/fused/halo_layout.hpp"

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_, int kWarps_>
struct HaloForwardConfig {
  using Element = T;
  static_assert(sizeof(T) == 2, "the halo kernel is 16-bit");
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockQ = 16 * kWarps;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowBytes = kChunks * 16;
  static constexpr int kDBlocks = kHeadDim / 8;  // n8 blocks of the output
  // 8-key blocks per softmax step: 32 keys, 16 scores per thread. A NAT warp (2x8
  // queries, 7x7 windows) has 8 rows of 14 keys, 16 blocks: four steps. (Steps of 8
  // blocks took 174 registers at head dim 32 with rpb, 216 at 64 (ptxas, sm_90a) and
  // spilled 150-280 bytes at 128.)
  static constexpr int kStepBlocks = 4;
  // Register budget: 128 per thread at 4 CTAs of 4 warps or 2 of 8 (the tiled
  // head-dim-32 kernel's, 4 CTAs of 4 warps: 128 registers); head dim 64 with 4 warps
  // 168 at 3 CTAs, which its shared memory allows anyway (NAT's 14x14 keys: 60 KB).
  static constexpr int kMinBlocksPerSM = kWarps == 8 ? 2 : kHeadDim == 32 ? 4 : 3;
  static_assert(kHeadDim == 32 || kHeadDim == 64, "the halo kernel's head-dim buckets are 32 and 64");

  // Row r's 16-byte chunk c sits at chunk c ^ swizzle(r), as in the tiled mma.sync
  // kernel: the 8 consecutive rows one ldmatrix reads hit 8 different bank groups
  // from any first row (rows are 64 or 128 bytes).
  __device__ static constexpr int swizzle(int r) { return kChunks >= 8 ? (r & 7) : ((r >> 1) & 3); }
  __device__ static constexpr int chunk_index(int r, int c) { return r * kChunks + (c ^ swizzle(r)); }
};

namespace detail_halo {

// A warp's key box walked as 8-key blocks: outer coordinates (y0, y1) and the
// block's first innermost coordinate x, relative to the warp's key box, and its first
// row in the halo. Row-major; x steps by 8 up to the box's padded width.
struct BlockWalk {
  int y0, y1, x, row;
  int width, extent1;          // padded innermost width (a multiple of 8), axis-1 extent
  int next_row1, next_row0;    // row steps at the end of an innermost run, of an axis-1 run
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

}  // namespace detail_halo

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    fused_forward_halo_kernel(const __grid_constant__ ForwardParams p) {
  using T = typename Cfg::Element;
  using Mma = nbhd::cuda::Mma<T>;
  using detail_fwd::kNegInf;
  constexpr int kChunks = Cfg::kChunks, kDBlocks = Cfg::kDBlocks, kStep = Cfg::kStepBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* k_smem = q_smem + Cfg::kBlockQ * Cfg::kHeadDim;
  T* v_smem = k_smem + (p.halo_rows + kHaloSlackRows) * Cfg::kHeadDim;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const TileShape& shape = p.shape;

  detail_fwd::QueryTile qt;
  if (!detail_fwd::locate_query_tile(p, blockIdx.x, qt)) return;
  const detail_fwd::Box kbox = detail_fwd::key_box(p, qt);
  const int halo1 = kbox.r[1].size(), halo2 = kbox.r[2].size();
  const int halo_rows = kbox.r[0].size() * halo1 * halo2;

  // ---- loads: the query tile and the halo, once ----------------------------------
  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  for (int idx = tid; idx < Cfg::kBlockQ * kChunks; idx += Cfg::kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * 8 < p.dim;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = qt.origin[a] + off[a];
      valid &= j[a] < qt.end[a];
    }
    const T* src = q_base;  // rows past the group's queries and columns past dim: zeros
    if (valid) {
      token_of(p.nb, qt.group, qt.lg, j, token);
      src = q_base + p.q_layout.offset(qt.b, token, qt.h) + c * 8;
    }
    ptx::cp_async_16(ptx::smem_address(&q_smem[Cfg::chunk_index(r, c) * 8]), src, valid ? 16 : 0);
  }
  // Halo row r is the key box's key r, row-major; on a periodic axis its token wraps.
  // Each thread copies 16-byte column `chunk` of rows first_row, first_row + kRowStep,
  // ..., its coordinates stepped without a division per row (two divisions per row
  // made the loop ~290 SASS instructions). Columns past dim (K) or dim_v (V) are zeros.
  {
    constexpr int kRowStep = Cfg::kThreads / kChunks;
    const int chunk = tid % kChunks, first_row = tid / kChunks;
    const bool k_ok = chunk * 8 < p.dim, v_ok = chunk * 8 < p.dim_v;
    const T* k_head = k_base + qt.b * p.k_layout.batch + qt.hk * p.k_layout.head + chunk * 8;
    const T* v_head = v_base + qt.b * p.v_layout.batch + qt.hk * p.v_layout.head + chunk * 8;
    const int step01 = kRowStep / halo2, step2 = kRowStep - step01 * halo2;
    int x2 = first_row % halo2, x01 = first_row / halo2;
    int x1 = x01 % halo1, x0 = x01 / halo1;
    for (int r = first_row; r < halo_rows; r += kRowStep) {
      const int j[kMaxRank] = {kbox.r[0].begin + x0, kbox.r[1].begin + x1, kbox.r[2].begin + x2};
      int token[kMaxRank];
      token_of(p.nb, qt.group, qt.lg, j, token);
      const int dst = Cfg::chunk_index(r, chunk) * 8;
      const int64_t k_at = token[0] * p.k_layout.axis[0] + token[1] * p.k_layout.axis[1] + token[2] * p.k_layout.axis[2];
      const int64_t v_at = token[0] * p.v_layout.axis[0] + token[1] * p.v_layout.axis[1] + token[2] * p.v_layout.axis[2];
      ptx::cp_async_16(ptx::smem_address(&k_smem[dst]), k_ok ? k_head + k_at : k_base, k_ok ? 16 : 0);
      ptx::cp_async_16(ptx::smem_address(&v_smem[dst]), v_ok ? v_head + v_at : v_base, v_ok ? 16 : 0);
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
  }
  // The slack rows past the halo: a masked key's P is an exact 0, and 0 times these
  // (finite) zeros adds nothing.
  for (int idx = tid; idx < kHaloSlackRows * kChunks; idx += Cfg::kThreads) {
    const int dst = (halo_rows * kChunks + idx) * 8;
    *reinterpret_cast<uint4*>(&k_smem[dst]) = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(&v_smem[dst]) = make_uint4(0, 0, 0, 0);
  }
  ptx::cp_async_commit();

  // ---- this warp's queries and keys (while the loads fly) ------------------------
  // The warp's key box: the union of its queries' windows, inside the tile's.
  int warp_off[kMaxRank];
  shape.warp_offset(warp, warp_off);
  Range wbox[kMaxRank];
  bool idle = false;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.nb.axis[a];
    const int first = qt.origin[a] + warp_off[a], last = imin(first + shape.w(a), qt.end[a]) - 1;
    idle |= last < first;
    wbox[a] = {ax.window(first, qt.lg[a]).begin, ax.window(imax(last, first), qt.lg[a]).end};
  }
  // Rows g and g + 8 of the warp's 16 (mma C layout): per axis the window as a begin
  // relative to the warp's key box and a length (0 for a row past the group's queries),
  // the innermost begin relative to this thread's first column of a block (2 t4).
  int row_j[2][kMaxRank], win_lo[2][kMaxRank], win_len[2][kMaxRank];
  bool row_valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int off[kMaxRank];
    shape.query_offset(warp * 16 + g + 8 * i, off);
    row_valid[i] = true;
    for (int a = 0; a < kMaxRank; ++a) {
      row_j[i][a] = qt.origin[a] + off[a];
      row_valid[i] &= row_j[i][a] < qt.end[a];
    }
    for (int a = 0; a < kMaxRank; ++a) {
      const Range w = p.nb.axis[a].window(row_j[i][a], qt.lg[a]);
      win_lo[i][a] = w.begin - wbox[a].begin - (a == kMaxRank - 1 ? 2 * t4 : 0);
      win_len[i][a] = row_valid[i] ? w.size() : 0;
    }
  }
  // rpb: the bias of key (y0, y1, x) for row i sits at rpb_row[i] + y0 a0 + y1 a1 + x a2
  // (relative position key - query + kernel - 1 per axis; x from this thread's column).
  const bool has_rpb = p.rpb != nullptr;
  int64_t rpb_row[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    rpb_row[i] = int64_t(qt.h) * p.rpb_layout.head + int64_t(2 * t4) * p.rpb_layout.axis[kMaxRank - 1];
    for (int a = 0; a < kMaxRank; ++a)
      rpb_row[i] += int64_t(wbox[a].begin - row_j[i][a] + p.nb.axis[a].kernel - 1) * p.rpb_layout.axis[a];
  }
  detail_halo::BlockWalk walk;
  walk.width = (wbox[2].size() + 7) & ~7;
  walk.extent1 = wbox[1].size();
  walk.next_row1 = halo2 - walk.width;
  walk.next_row0 = (halo1 - walk.extent1) * halo2;
  walk.y0 = walk.y1 = walk.x = 0;
  walk.row = ((wbox[0].begin - kbox.r[0].begin) * halo1 + (wbox[1].begin - kbox.r[1].begin)) * halo2 +
             (wbox[2].begin - kbox.r[2].begin);
  const int blocks = wbox[0].size() * walk.extent1 * (walk.width / 8);

  ptx::cp_async_wait<0>();
  __syncthreads();  // the tile and its halo landed; no barrier follows
  if (idle) return;

  // Q's fragments for the whole head dim, once.
  const int lane_swizzle = Cfg::swizzle(lane & 7);
  typename Mma::A qa[kChunks / 2];
  {
    const uint32_t q_lane = ptx::smem_address(q_smem) + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kRowBytes;
#pragma unroll
    for (int kk = 0; kk < kChunks / 2; ++kk) qa[kk] = Mma::load_a(q_lane + (((2 * kk + (lane >> 4)) ^ lane_swizzle) << 4));
  }
  const uint32_t k_addr = ptx::smem_address(k_smem), v_addr = ptx::smem_address(v_smem);

  float o[kDBlocks][4];
#pragma unroll
  for (int d = 0; d < kDBlocks; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};

  for (int first = 0; first < blocks; first += kStep) {
    // This step's blocks: their first halo rows (a block past the warp's keys reads
    // the first block's rows and is masked whole: every step computes kStep blocks,
    // without branches), and which of this thread's scores its queries attend: bit
    // 4j + 2i + e for row i, column 2 t4 + e of block j.
    const detail_halo::BlockWalk step_start = walk;
    int block_row[kStep];
    uint32_t attended = 0;
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      const bool on = j == 0 || first + j < blocks;
      block_row[j] = on ? walk.row : block_row[0];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool outer = on && unsigned(walk.y0 - win_lo[i][0]) < unsigned(win_len[i][0]) &&
                           unsigned(walk.y1 - win_lo[i][1]) < unsigned(win_len[i][1]);
#pragma unroll
        for (int e = 0; e < 2; ++e)
          attended |= uint32_t(outer && unsigned(walk.x + e - win_lo[i][2]) < unsigned(win_len[i][2])) << (4 * j + 2 * i + e);
      }
      walk.advance();
    }

    // S = Q K^T, two blocks per ldmatrix: lanes 0-15 address the first block's 8
    // rows (two chunks), lanes 16-31 the second's.
    float s[kStep][4];
#pragma unroll
    for (int j = 0; j < kStep; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
    for (int pair = 0; pair < kStep / 2; ++pair) {
      const int row = (lane < 16 ? block_row[2 * pair] : block_row[2 * pair + 1]) + (lane & 7);
      const uint32_t k_lane = k_addr + row * Cfg::kRowBytes;
      const int swz = Cfg::swizzle(row);
#pragma unroll
      for (int kk = 0; kk < kChunks / 2; ++kk) {
        typename Mma::B b0, b1;
        Mma::load_b_nk(k_lane + (((2 * kk + ((lane >> 3) & 1)) ^ swz) << 4), b0, b1);
        Mma::mma(s[2 * pair], qa[kk], b0);
        Mma::mma(s[2 * pair + 1], qa[kk], b1);
      }
    }

    // Scale to base-2 units and mask; the bias walks the step's blocks again (their
    // coordinates are not kept: registers).
#pragma unroll
    for (int j = 0; j < kStep; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = (attended >> (4 * j + e)) & 1u ? s[j][e] * p.scale_log2 : kNegInf;
    if (has_rpb) {
      detail_halo::BlockWalk at = step_start;
#pragma unroll
      for (int j = 0; j < kStep; ++j) {
        const int64_t block_at = int64_t(at.y0) * p.rpb_layout.axis[0] + int64_t(at.y1) * p.rpb_layout.axis[1] +
                                 int64_t(at.x) * p.rpb_layout.axis[2];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (((attended >> (4 * j + e)) & 1u) == 0) continue;
          const int64_t o = rpb_row[e >> 1] + block_at + ((e & 1) ? p.rpb_layout.axis[2] : 0);
          const float bias = p.rpb_is_float32 ? __ldg(static_cast<const float*>(p.rpb) + o)
                                              : to_float(static_cast<const T*>(p.rpb)[o]);
          s[j][e] += bias * kLog2e;
        }
        at.advance();
      }
    }

    float rescale[2];
    detail_fwd::online_softmax(s, row_max, row_sum, 1.f, rescale);
    detail_fwd::rescale_o(o, rescale);

    // O += P V, P from registers (two blocks' C layout is k16's A layout); V's rows by
    // ldmatrix.trans: lanes 0-7 and 16-23 the first block's, 8-15 and 24-31 the second's.
#pragma unroll
    for (int kb = 0; kb < kStep / 2; ++kb) {
      uint32_t a[4];
      a[0] = ptx::pack2<T>(s[2 * kb][0], s[2 * kb][1]);
      a[1] = ptx::pack2<T>(s[2 * kb][2], s[2 * kb][3]);
      a[2] = ptx::pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
      a[3] = ptx::pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
      const int row = (((lane >> 3) & 1) ? block_row[2 * kb + 1] : block_row[2 * kb]) + (lane & 7);
      const uint32_t v_lane = v_addr + row * Cfg::kRowBytes;
      const int swz = Cfg::swizzle(row);
#pragma unroll
      for (int dp = 0; dp < kDBlocks / 2; ++dp) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, v_lane + (((2 * dp + (lane >> 4)) ^ swz) << 4));
        ptx::mma_16816<T>(o[2 * dp], a, bv);
        ptx::mma_16816<T>(o[2 * dp + 1], a, bv + 2);
      }
    }
  }

  // ---- epilogue: out = O / sum, staged through this warp's rows of the query tile ----
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = detail_fwd::quad_sum(row_sum[i]);
    inv[i] = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
  }
#pragma unroll
  for (int d = 0; d < kDBlocks; ++d)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      T* dst = &q_smem[Cfg::chunk_index(warp * 16 + g + 8 * i, d) * 8 + 2 * t4];
      dst[0] = from_float<T>(o[d][2 * i] * inv[i]);
      dst[1] = from_float<T>(o[d][2 * i + 1] * inv[i]);
    }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = warp * 16 + idx / kChunks, c = idx % kChunks;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * 8 < p.dim_v;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = qt.origin[a] + off[a];
      valid &= j[a] < qt.end[a];
    }
    if (!valid) continue;
    token_of(p.nb, qt.group, qt.lg, j, token);
    *reinterpret_cast<uint4*>(out + p.out_layout.offset(qt.b, token, qt.h) + c * 8) =
        *reinterpret_cast<const uint4*>(&q_smem[Cfg::chunk_index(r, c) * 8]);
  }
  if (p.lse && t4 == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_valid[i]) continue;
      int token[kMaxRank];
      token_of(p.nb, qt.group, qt.lg, row_j[i], token);
      p.lse[p.lse_layout.offset(qt.b, token, qt.h)] = (row_max[i] + log2f(row_sum[i])) * kLn2;
    }
  }
}

template <class Cfg>
cudaError_t launch_fused_forward_halo(const ForwardParams& p, int64_t batch, cudaStream_t stream) {
  auto kernel = fused_forward_halo_kernel<Cfg>;
  if (const cudaError_t e = allow_shared_memory<fused_forward_halo_kernel<Cfg>>(kHaloMaxSharedBytes); e != cudaSuccess)
    return e;
  const int64_t blocks = p.tiles * p.heads * batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int bytes = halo_shared_bytes(Cfg::kBlockQ, Cfg::kHeadDim, p.halo_rows);
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
