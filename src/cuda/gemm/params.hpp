// SPDX-License-Identifier: Apache-2.0
// Arguments of the gemm kernels, computed once on the host (ops.cu).
#pragma once

#include <cstdint>

#include "core/layout.hpp"
#include "cuda/gemm/tile.hpp"

namespace nbhd::cuda::gemm {

// A [B, X..., heads, D] tensor (or additional tokens [B, M, heads, D]) as a kernel reads it.
struct Operand {
  const void* data;
  detail::TokenLayout layout;
  bool vec;  // rows load as 16-byte vectors: aligned base and strides, unit inner stride, D % 16 bytes == 0
};

// Query tiles of PN and NN over the grid: per axis tiles_per_group tiles in each of
// the axis's dilation groups (the shorter groups leave their last tiles empty).
struct QueryGrid {
  Neighborhood nb;
  TileShape shape;
  int tiles_per_group[kMaxRank];
  int64_t tiles;  // query tiles per (batch, head)
  int heads, heads_per_kv;
};

// What PN does with a finished row of slots before storing it.
enum class Epilogue : int {
  kStore,            // the slots as computed
  kSoftmax,          // softmax over the row (whole-row slabs only), lse if requested
  kSoftmaxBackward,  // d scores = probs * (slots - <probs, slots>) (whole-row slabs only)
};

// PN: out[q, h, slot] = alpha * <x[q, h], y[key(q, slot), h / G]> (+ rpb), masked
// where a causal window does not reach.
struct PnParams {
  QueryGrid grid;
  SlabPlan slabs;
  PnSmem smem;
  int dim, dim_pad;   // dot-product length, rounded up to 16
  int window, extra;  // W, M
  float alpha, masked;
  Epilogue epilogue;
  Operand x, y, y_extra;
  const void* rpb;  // null when absent
  detail::RpbLayout rpb_layout;
  bool rpb_float32;
  void* out;  // weights, type A
  detail::TokenLayout out_layout;
  bool out_vec;       // rows start on 16 bytes, unit inner stride
  int out_capacity;   // writable slots per row (>= W + M): a row's last 16 bytes are written whole
  const void* probs;  // kSoftmaxBackward: probabilities in out's type and layout
  float* lse;         // kSoftmax: optional
  detail::TokenLayout lse_layout;
};

// NN: out[q, h] = alpha * sum over slots of w[q, h, slot] * y[key(q, slot), h / G];
// one CTA per (query tile, head, batch, kCols output columns).
struct NnParams {
  QueryGrid grid;
  SlabPlan slabs;
  NnSmem smem;
  int dim;  // output columns
  int window, extra;
  int weight_capacity;  // readable slots per weight row (>= W + M): vector loads stay inside
  float alpha;
  const void* weights;  // type A
  detail::TokenLayout w_layout;
  bool w_vec;
  Operand y, y_extra;
  void* out;
  detail::TokenLayout out_layout;
  bool out_vec;
};

// IN: out[k, hkv] = alpha * sum over the queries q whose window holds k, and the heads
// h of hkv's group, of w[q, h, slot(q, k)] * x[q, h]; one CTA per (key tile, kv head,
// batch, kCols output columns).
struct InParams {
  Neighborhood nb;
  TileShape shape;  // k_log2: the key tile; q_log2: the query tiles walked
  int tiles_per_group[kMaxRank];
  int64_t tiles;  // key tiles per (batch, kv head)
  int kv_heads, heads_per_kv;
  int dim;  // columns of x and out
  InSmem smem;
  float alpha;
  const void* weights;  // type A
  detail::TokenLayout w_layout;
  Operand x;
  void* out;
  detail::TokenLayout out_layout;
  bool out_vec;
};

}  // namespace nbhd::cuda::gemm
