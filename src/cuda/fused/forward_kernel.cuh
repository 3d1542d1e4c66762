// SPDX-License-Identifier: Apache-2.0
// Fused neighborhood attention forward on tensor cores (mma.sync m16n8k16, sm_80+).
//
// One CTA computes one query tile (a box of one dilation group) for one head. Its
// keys are the union of its queries' windows (a box, by monotonicity of windows),
// walked in key tiles that are double-buffered in shared memory by cp.async. Each
// warp owns 16 queries forming a smaller box; for every key tile it
//   - skips the tile when the tile misses the union of its queries' windows,
//   - skips each 8-key chunk that misses that union (ballot over chunks),
//   - applies the element mask only when the tile is not inside the intersection
//     of its queries' windows (or when an RPB must be added),
// then runs the online softmax and P·V with P kept in registers. The M additional
// tokens follow as plain key tiles. Out and lse are written once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/common/numeric.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/fused/params.hpp"

namespace nbhd::cuda::fused {

template <class T, int kHeadDim_, int kWarps_, int kBlockKV_>
struct ForwardConfig {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;  // padded: dim and dim_v fit in it
  static constexpr int kWarps = kWarps_;
  static constexpr int kBlockQ = 16 * kWarps;
  static constexpr int kBlockKV = kBlockKV_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per row
  static constexpr int kNBlocks = kBlockKV / 8;  // n8 blocks of a score tile
  static constexpr int kDBlocks = kHeadDim / 8;  // n8 blocks of the output
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim bucket must be 32, 64, 128 or 256");
  static_assert(kBlockKV % 16 == 0 && kBlockKV <= 128, "key tile must be a multiple of 16 keys");

  struct SharedStorage {
    T q[kBlockQ * kHeadDim];  // reused to stage the output
    T k[2][kBlockKV * kHeadDim];
    T v[2][kBlockKV * kHeadDim];
  };
  static constexpr int kSharedBytes = int(sizeof(SharedStorage));

  // 16-byte chunk `c` of row `r` lives at chunk c ^ swizzle(r): the 8 rows one
  // ldmatrix reads then hit 8 different bank groups (rows are 64-512 bytes apart).
  __device__ static constexpr int chunk_index(int r, int c) {
    const int swizzle = kChunks >= 8 ? (r & 7) : ((r >> 1) & 3);
    return r * kChunks + (c ^ swizzle);
  }
};

namespace detail_fwd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Per axis [begin, end) ranges of group indices, 3 axes.
struct Box {
  Range r[kMaxRank];
  __device__ bool empty() const { return r[0].size() <= 0 || r[1].size() <= 0 || r[2].size() <= 0; }
};

}  // namespace detail_fwd

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) fused_forward_kernel(const __grid_constant__ ForwardParams p) {
  using T = typename Cfg::Element;
  using detail_fwd::Box;
  using detail_fwd::kNegInf;
  constexpr int kBlockQ = Cfg::kBlockQ, kBlockKV = Cfg::kBlockKV, kChunks = Cfg::kChunks;
  constexpr int kNBlocks = Cfg::kNBlocks, kDBlocks = Cfg::kDBlocks;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const TileShape& shape = p.shape;

  // ---- which tile, head, batch ------------------------------------------------
  int64_t linear = blockIdx.x;
  const int64_t tile = linear % p.tiles;
  linear /= p.tiles;
  const int h = int(linear % p.heads);
  const int64_t b = linear / p.heads;
  const int hk = h / p.heads_per_kv;

  int group[kMaxRank], lg[kMaxRank], q_origin[kMaxRank];
  {
    int64_t rest = tile;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int per_axis = p.tiles_per_group[a] * p.nb.axis[a].dilation;
      const int ta = int(rest % per_axis);
      rest /= per_axis;
      group[a] = ta / p.tiles_per_group[a];
      q_origin[a] = (ta % p.tiles_per_group[a]) << shape.q_log2[a];
      lg[a] = p.nb.axis[a].group_length(group[a]);
      if (q_origin[a] >= lg[a]) return;  // the shorter groups have fewer tiles
    }
  }

  // Key box of the CTA: union of its queries' windows (first and last valid query).
  Box kbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.nb.axis[a];
    const int last = imin(q_origin[a] + shape.q(a), lg[a]) - 1;
    kbox.r[a] = {ax.window(q_origin[a], lg[a]).begin, ax.window(last, lg[a]).end};
  }
  int key_tiles_axis[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) key_tiles_axis[a] = ceil_div(kbox.r[a].size(), shape.k(a));
  const int neighbor_tiles = key_tiles_axis[0] * key_tiles_axis[1] * key_tiles_axis[2];
  const int additional_tiles = ceil_div(p.additional_tokens, kBlockKV);
  const int total_tiles = neighbor_tiles + additional_tiles;

  // Group index of key tile `it` along each axis (its origin).
  auto key_tile_origin = [&](int it, int* origin) {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      origin[a] = kbox.r[a].begin + (it % key_tiles_axis[a]) * shape.k(a);
      it /= key_tiles_axis[a];
    }
  };
  auto token_of = [&](const int* j, int* token) {
    for (int a = 0; a < kMaxRank; ++a) token[a] = group[a] + p.nb.axis[a].dilation * j[a];
  };

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  // ---- loads ------------------------------------------------------------------
  auto load_q = [&]() {
    for (int idx = tid; idx < kBlockQ * kChunks; idx += Cfg::kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      int off[kMaxRank], j[kMaxRank], token[kMaxRank];
      shape.query_offset(r, off);
      bool valid = c * 8 < p.dim;
      for (int a = 0; a < kMaxRank; ++a) {
        j[a] = q_origin[a] + off[a];
        valid &= j[a] < lg[a];
      }
      const T* src = q_base;
      if (valid) {
        token_of(j, token);
        src = q_base + p.q_layout.offset(b, token, h) + c * 8;
      }
      ptx::cp_async_16(ptx::smem_address(&smem.q[Cfg::chunk_index(r, c) * 8]), src, valid ? 16 : 0);
    }
  };
  auto load_kv = [&](int it, int stage) {
    if (it < neighbor_tiles) {
      int origin[kMaxRank];
      key_tile_origin(it, origin);
      for (int idx = tid; idx < kBlockKV * kChunks; idx += Cfg::kThreads) {
        const int n = idx / kChunks, c = idx % kChunks;
        int off[kMaxRank], j[kMaxRank], token[kMaxRank];
        shape.key_offset(n, off);
        bool valid = true;
        for (int a = 0; a < kMaxRank; ++a) {
          j[a] = origin[a] + off[a];
          valid &= j[a] < kbox.r[a].end;
        }
        token_of(j, token);
        const bool k_ok = valid && c * 8 < p.dim, v_ok = valid && c * 8 < p.dim_v;
        const T* ks = k_ok ? k_base + p.k_layout.offset(b, token, hk) + c * 8 : k_base;
        const T* vs = v_ok ? v_base + p.v_layout.offset(b, token, hk) + c * 8 : v_base;
        const int dst = Cfg::chunk_index(n, c) * 8;
        ptx::cp_async_16(ptx::smem_address(&smem.k[stage][dst]), ks, k_ok ? 16 : 0);
        ptx::cp_async_16(ptx::smem_address(&smem.v[stage][dst]), vs, v_ok ? 16 : 0);
      }
    } else {
      const int m0 = (it - neighbor_tiles) * kBlockKV;
      const T* ak = static_cast<const T*>(p.additional_k);
      const T* av = static_cast<const T*>(p.additional_v);
      for (int idx = tid; idx < kBlockKV * kChunks; idx += Cfg::kThreads) {
        const int n = idx / kChunks, c = idx % kChunks;
        const int token[kMaxRank] = {0, 0, m0 + n};
        const bool valid = m0 + n < p.additional_tokens;
        const bool k_ok = valid && c * 8 < p.dim, v_ok = valid && c * 8 < p.dim_v;
        const T* ks = k_ok ? ak + p.ak_layout.offset(b, token, hk) + c * 8 : ak;
        const T* vs = v_ok ? av + p.av_layout.offset(b, token, hk) + c * 8 : av;
        const int dst = Cfg::chunk_index(n, c) * 8;
        ptx::cp_async_16(ptx::smem_address(&smem.k[stage][dst]), ks, k_ok ? 16 : 0);
        ptx::cp_async_16(ptx::smem_address(&smem.v[stage][dst]), vs, v_ok ? 16 : 0);
      }
    }
  };

  // ---- this warp's queries ------------------------------------------------------
  // Rows g and g + 8 of the warp belong to this thread (mma C layout).
  int row_j[2][kMaxRank];
  Range row_win[2][kMaxRank];
  bool row_valid[2];
  for (int i = 0; i < 2; ++i) {
    int off[kMaxRank];
    shape.query_offset(warp * 16 + g + 8 * i, off);
    row_valid[i] = true;
    for (int a = 0; a < kMaxRank; ++a) {
      row_j[i][a] = q_origin[a] + off[a];
      row_valid[i] &= row_j[i][a] < lg[a];
    }
    for (int a = 0; a < kMaxRank; ++a)
      row_win[i][a] = row_valid[i] ? p.nb.axis[a].window(row_j[i][a], lg[a]) : Range{0, 0};
  }
  // Union and intersection of the warp's windows (first and last valid query per axis).
  Box warp_union, warp_inter;
  {
    int off[kMaxRank];
    shape.warp_offset(warp, off);
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = p.nb.axis[a];
      const int first = q_origin[a] + off[a];
      const int last = imin(first + shape.w(a), lg[a]) - 1;
      if (first > last) {
        warp_union.r[a] = warp_inter.r[a] = {0, 0};
        continue;
      }
      const Range wf = ax.window(first, lg[a]), wl = ax.window(last, lg[a]);
      warp_union.r[a] = {wf.begin, wl.end};
      warp_inter.r[a] = {wl.begin, wf.end};
    }
  }
  const bool warp_idle = warp_union.empty();

  // ---- main loop --------------------------------------------------------------------
  float o[kDBlocks][4];
  for (int d = 0; d < kDBlocks; ++d)
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};
  const bool has_rpb = p.rpb != nullptr;
  const float rpb_log2 = kLog2e;

  load_q();
  load_kv(0, 0);
  ptx::cp_async_commit();

  for (int it = 0; it < total_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < total_tiles) {
      load_kv(it + 1, stage ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();

    const bool additional = it >= neighbor_tiles;
    int origin[kMaxRank] = {0, 0, 0};
    uint32_t active = 0;  // bit j: n8 chunk j has keys this warp may attend
    bool needs_mask = true;
    if (!warp_idle) {
      if (!additional) {
        key_tile_origin(it, origin);
        // Chunk j holds keys 8j..8j+7 of the tile: fixed coordinates on axes 0 and 1
        // (the innermost tile extent is a multiple of 8), a run of 8 on axis 2.
        bool lane_active = false;
        if (lane < kNBlocks) {
          int off[kMaxRank];
          shape.key_offset(lane * 8, off);
          lane_active = true;
          for (int a = 0; a < kMaxRank; ++a) {
            const int lo = origin[a] + off[a], hi = lo + (a == kMaxRank - 1 ? 8 : 1);
            lane_active &= lo < warp_union.r[a].end && hi > warp_union.r[a].begin && lo < kbox.r[a].end;
          }
        }
        active = __ballot_sync(0xffffffffu, lane_active);
        // Inside every window of the warp and inside the key box: no element mask.
        needs_mask = has_rpb;
        for (int a = 0; a < kMaxRank; ++a) {
          const int lo = origin[a], hi = origin[a] + shape.k(a);
          needs_mask |= lo < warp_inter.r[a].begin || hi > warp_inter.r[a].end || hi > kbox.r[a].end;
        }
      } else {
        const int m0 = (it - neighbor_tiles) * kBlockKV;
        active = __ballot_sync(0xffffffffu, lane < kNBlocks && m0 + lane * 8 < p.additional_tokens);
        needs_mask = m0 + kBlockKV > p.additional_tokens;
      }
    }

    if (active) {
      // S = Q K^T for the active chunks.
      float s[kNBlocks][4];
      for (int j = 0; j < kNBlocks; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
        uint32_t a[4];
        {
          const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * kk + (lane >> 4);
          ptx::ldmatrix_x4(a, ptx::smem_address(&smem.q[Cfg::chunk_index(r, c) * 8]));
        }
#pragma unroll
        for (int pair = 0; pair < kNBlocks / 2; ++pair) {
          if (((active >> (2 * pair)) & 3u) == 0) continue;
          uint32_t bk[4];
          const int n = 16 * pair + (lane >> 4) * 8 + (lane & 7), c = 2 * kk + ((lane >> 3) & 1);
          ptx::ldmatrix_x4(bk, ptx::smem_address(&smem.k[stage][Cfg::chunk_index(n, c) * 8]));
          ptx::mma_16816<T>(s[2 * pair], a, bk);
          ptx::mma_16816<T>(s[2 * pair + 1], a, bk + 2);
        }
      }

      // Scale to base-2 units, add the bias, mask.
#pragma unroll
      for (int j = 0; j < kNBlocks; ++j) {
        const bool chunk_on = (active >> j) & 1u;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, n = 8 * j + 2 * t4 + (e & 1);
          float x = s[j][e] * p.scale_log2;
          bool keep = chunk_on;
          if (keep && needs_mask) {
            if (additional) {
              keep = (it - neighbor_tiles) * kBlockKV + n < p.additional_tokens;
            } else {
              int off[kMaxRank], idx[kMaxRank];
              shape.key_offset(n, off);
              for (int a = 0; a < kMaxRank; ++a) {
                const int key = origin[a] + off[a];
                keep &= row_win[i][a].contains(key) && key < kbox.r[a].end;
                idx[a] = key - row_j[i][a] + p.nb.axis[a].kernel - 1;
              }
              if (keep && has_rpb) {
                const int64_t ro = p.rpb_layout.offset(h, idx);
                const float bias = p.rpb_is_float32 ? __ldg(static_cast<const float*>(p.rpb) + ro)
                                                    : to_float(static_cast<const T*>(p.rpb)[ro]);
                x += bias * rpb_log2;
              }
            }
          }
          s[j][e] = keep ? x : kNegInf;
        }
      }

      // Online softmax: running max and (thread-partial) sum per row.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = row_max[i];
        for (int j = 0; j < kNBlocks; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
        mx = detail_fwd::quad_max(mx);
        // A row with no key yet keeps -inf; exp2 against 0 then gives exact zeros.
        const float ref = mx == kNegInf ? 0.f : mx;
        const float rescale = exp2f(row_max[i] - ref);
        row_max[i] = mx;
        float sum = 0.f;
        for (int j = 0; j < kNBlocks; ++j) {
          s[j][2 * i] = exp2f(s[j][2 * i] - ref);
          s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - ref);
          sum += s[j][2 * i] + s[j][2 * i + 1];
        }
        row_sum[i] = row_sum[i] * rescale + sum;
        for (int d = 0; d < kDBlocks; ++d) {
          o[d][2 * i] *= rescale;
          o[d][2 * i + 1] *= rescale;
        }
      }

      // O += P V, P from registers (the C layout of two n8 blocks is the A layout of k16).
#pragma unroll
      for (int kb = 0; kb < kBlockKV / 16; ++kb) {
        if (((active >> (2 * kb)) & 3u) == 0) continue;
        uint32_t a[4];
        a[0] = ptx::pack2<T>(s[2 * kb][0], s[2 * kb][1]);
        a[1] = ptx::pack2<T>(s[2 * kb][2], s[2 * kb][3]);
        a[2] = ptx::pack2<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
        a[3] = ptx::pack2<T>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
#pragma unroll
        for (int dp = 0; dp < kDBlocks / 2; ++dp) {
          uint32_t bv[4];
          const int n = 16 * kb + (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * dp + (lane >> 4);
          ptx::ldmatrix_x4_trans(bv, ptx::smem_address(&smem.v[stage][Cfg::chunk_index(n, c) * 8]));
          ptx::mma_16816<T>(o[2 * dp], a, bv);
          ptx::mma_16816<T>(o[2 * dp + 1], a, bv + 2);
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }

  // ---- epilogue: out = O / sum, staged through this warp's rows of smem.q ----------
  float inv[2];
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = detail_fwd::quad_sum(row_sum[i]);
    inv[i] = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
  }
  for (int d = 0; d < kDBlocks; ++d)
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + g + 8 * i;
      T* dst = &smem.q[Cfg::chunk_index(r, d) * 8 + 2 * t4];
      dst[0] = from_float<T>(o[d][2 * i] * inv[i]);
      dst[1] = from_float<T>(o[d][2 * i + 1] * inv[i]);
    }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int rr = idx / kChunks, c = idx % kChunks, r = warp * 16 + rr;
    int off[kMaxRank], j[kMaxRank], token[kMaxRank];
    shape.query_offset(r, off);
    bool valid = c * 8 < p.dim_v;
    for (int a = 0; a < kMaxRank; ++a) {
      j[a] = q_origin[a] + off[a];
      valid &= j[a] < lg[a];
    }
    if (!valid) continue;
    token_of(j, token);
    *reinterpret_cast<uint4*>(out + p.out_layout.offset(b, token, h) + c * 8) =
        *reinterpret_cast<const uint4*>(&smem.q[Cfg::chunk_index(r, c) * 8]);
  }
  if (p.lse && t4 == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    for (int i = 0; i < 2; ++i) {
      if (!row_valid[i]) continue;
      int token[kMaxRank];
      token_of(row_j[i], token);
      p.lse[p.lse_layout.offset(b, token, h)] = (row_max[i] + log2f(row_sum[i])) * kLn2;
    }
  }
}

template <class Cfg>
cudaError_t launch_fused_forward(const ForwardParams& p, int64_t batch, cudaStream_t stream) {
  auto kernel = fused_forward_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSharedBytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.tiles * p.heads * batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), Cfg::kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nbhd::cuda::fused
