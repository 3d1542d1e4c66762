// SPDX-License-Identifier: Apache-2.0
// Arguments of the fused forward kernel, computed once on the host.
#pragma once

#include <cstdint>

#include "core/layout.hpp"
#include "cuda/common/tile_shape.hpp"

namespace nbhd::cuda::fused {

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
  int tiles_per_group[kMaxRank];  // query tiles along each axis in every dilation group
  int64_t tiles;                  // query tiles per (batch, head)
  int heads, heads_per_kv;
  int dim, dim_v;
  int additional_tokens;
  float scale_log2;  // softmax scale * log2(e): scores live in base-2 units
};

}  // namespace nbhd::cuda::fused
