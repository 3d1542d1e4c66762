// SPDX-License-Identifier: Apache-2.0
// Arguments of the fused forward kernel, computed once on the host.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "core/layout.hpp"
#include "cuda/common/tile_shape.hpp"
#include "cuda/common/tma_view.hpp"

namespace nbhd::cuda::fused {

// The warp-specialized kernels' TMA loads (plan.hpp, forward_tma_views): a tensor
// map and its view per tensor; q's box is one warp's 16 queries, k's and v's a key
// tile.
struct ForwardTma {
  CUtensorMap q, k, v;
  TmaView q_view, k_view, v_view;
};

struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* additional_k;
  const void* additional_v;
  const void* rpb;  // null when absent
  void* out;
  float* lse;       // null when not requested
  detail::TokenLayout q_layout, k_layout, v_layout, out_layout, lse_layout, ak_layout, av_layout;
  detail::RpbLayout rpb_layout;
  bool rpb_is_float32;

  Neighborhood nb;
  TileShape shape;
  // The queries computed: tokens [query_begin, query_end) per axis (the problem's
  // query sub-box, else the grid). q, out and lse hold the box's tokens only; their
  // pointers are moved back by the box origin's offset, so that grid tokens index
  // them (backend.cu, box_base).
  int query_begin[kMaxRank], query_end[kMaxRank];
  int tiles_per_group[kMaxRank];  // query tiles along each axis in every dilation group
  int64_t tiles;                  // query tiles per (batch, head)
  int heads, heads_per_kv;
  int dim, dim_v;
  int additional_tokens;
  float scale_log2;  // softmax scale * log2(e): scores live in base-2 units
  bool use_tma;      // the producer loads by TMA through `tma`, else by cp.async
  // The warp-specialized kernels' consumer warpgroups take turns to issue their
  // wgmmas (named barriers; forward_kernel.cuh), else each issues when ready (the
  // default for 128-key tiles; backend.cu, pingpong_schedule).
  bool pingpong;
  ForwardTma tma;
  // The halo kernel's key rows in shared memory (halo_rows_bound in plan.hpp: no
  // tile's key box holds more).
  int halo_rows;
};

}  // namespace nbhd::cuda::fused
