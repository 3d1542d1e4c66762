// SPDX-License-Identifier: Apache-2.0
// PN (pointwise-neighborhood, "QK"): out[q, h, slot] = alpha * <x[q, h], y[key, h / G]>
// (+ rpb) for every window slot, then the additional tokens. Scores when x = q,
// y = k; d probs when x = d out, y = v.
#include <cmath>

#include "cuda/common/check.hpp"
#include "cuda/naive/device.cuh"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/walk.hpp"

namespace nbhd::cuda::naive {
namespace {

struct PnParams {
  Neighborhood nb;
  int64_t rows;   // batch * query tokens * heads
  TokenBox box;   // the query rows (x and out are the box's tensors)
  int64_t heads, heads_per_kv;
  LaneGroup group;
  int dim, chunks;    // elements of the dot product, and their kChunk-element chunks
  int window, slots;  // W, and W + M
  int extra;          // M
  bool vectorized;
  bool rpb_float32;
  float alpha, masked;
  In x, y, y_extra;
  const void* rpb;
  detail::RpbLayout rpb_layout;
  Out out;
};

// A row (query, head) belongs to `lanes` lanes of one warp, each holding a chunk of
// 8 elements of x in registers; per slot they read one y row together (a 64-byte
// fp16 row at head dim 32 is 4 lanes x 16 bytes) and sum over the group with
// shuffles. Lane i keeps the score of slot i (mod lanes), so a group writes `lanes`
// consecutive slots at once instead of one float per store.
// At least 2 blocks per SM: ptxas otherwise aims at 3 for 16-bit types and spills
// ~90 bytes per thread at 80 registers; with 2 it takes 100 registers and spills none.
template <class T, class A>
__global__ void __launch_bounds__(kBlock, 2) pn_kernel(const __grid_constant__ PnParams p) {
  const T* x = static_cast<const T*>(p.x.data);
  const T* y = static_cast<const T*>(p.y.data);
  const T* y_extra = static_cast<const T*>(p.y_extra.data);
  A* out = static_cast<A*>(p.out.data);
  const int lanes = p.group.lanes;

  for_each_row_uniform(p.rows, p.group, [&](int64_t row, int sub, bool active) {
    const RowIndex r = decode_row(row, p.box, p.heads);
    const int64_t hk = divide(r.head, p.heads_per_kv);
    const T* x_row = x + p.x.layout.offset(r.batch, r.box_token, r.head);
    const int64_t x_inner = p.x.layout.inner;

    float xr[kChunk] = {};  // this lane's first chunk of x, for the whole window
    if (active && sub < p.chunks) load_chunk(x_row, x_inner, sub, chunk_size(sub, p.dim), p.vectorized, xr);

    // This lane's share of <x, y_row>; the chunks past the first (head dims > 8 *
    // lanes = 256) are read again per slot.
    auto partial_dot = [&](const T* y_row, int64_t y_inner) {
      float s = 0.f;
      float yv[kChunk];
      if (sub < p.chunks) {
        load_chunk(y_row, y_inner, sub, chunk_size(sub, p.dim), p.vectorized, yv);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) s = fmaf(xr[i], yv[i], s);
      }
      for (int c = sub + lanes; c < p.chunks; c += lanes) {
        float xv[kChunk];
        load_chunk(x_row, x_inner, c, chunk_size(c, p.dim), p.vectorized, xv);
        load_chunk(y_row, y_inner, c, chunk_size(c, p.dim), p.vectorized, yv);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) s = fmaf(xv[i], yv[i], s);
      }
      return s;
    };

    A* out_row = out + p.out.layout.offset(r.batch, r.box_token, r.head);
    const int64_t out_inner = p.out.layout.inner;
    float kept = 0.f;
    // Every lane of the group calls emit with the same slot and value.
    auto emit = [&](int slot, float value) {
      const int in_batch = slot & (lanes - 1);
      if (sub == in_batch) kept = value;
      if ((in_batch == lanes - 1 || slot == p.slots - 1) && active && sub <= in_batch)
        out_row[int64_t(slot - in_batch + sub) * out_inner] = from_float<A>(kept);
    };

    const Neighborhood::Windows w = p.nb.windows(r.token);
    for_each_window_slot(p.nb, w, [&](int slot, const int* key, bool valid) {
      valid = valid && active;
      const float dot =
          group_sum(valid ? partial_dot(y + p.y.layout.offset(r.batch, key, hk), p.y.layout.inner) : 0.f, lanes);
      float value = p.masked;
      if (valid) {
        value = p.alpha * dot;
        if (p.rpb) {
          int idx[kMaxRank];
          for (int a = 0; a < kMaxRank; ++a) idx[a] = Neighborhood::rpb_index(p.nb.axis[a], r.token[a], key[a]);
          value += load_bias<T>(p.rpb, p.rpb_float32, p.rpb_layout.offset(r.head, idx));
        }
      }
      emit(slot, value);
    });
    for (int m = 0; m < p.extra; ++m) {
      const int token[kMaxRank] = {0, 0, m};
      const T* y_row = y_extra + p.y_extra.layout.offset(r.batch, token, hk);
      const float dot = group_sum(active ? partial_dot(y_row, p.y_extra.layout.inner) : 0.f, lanes);
      emit(p.window + m, p.alpha * dot);
    }
  });
}

}  // namespace

Status pn(const Problem& p, const PnArgs& a, cudaStream_t stream) {
  PnParams k{};
  k.nb = p.neighborhood();
  k.rows = weight_rows(p);
  k.box = query_box(p);
  k.heads = p.heads;
  k.heads_per_kv = p.heads_per_kv();
  k.dim = int(a.x.shape[a.x.ndim - 1]);
  k.chunks = int(ceil_div64(k.dim, kChunk));
  const int lanes = lanes_for(k.chunks);
  k.group = {lanes, log2_exact(lanes)};
  k.window = int(p.window_size());
  k.slots = int(weight_slots(p));
  k.extra = int(p.additional_tokens);
  k.vectorized = rows_vectorizable(a.x) && rows_vectorizable(a.y) && rows_vectorizable(a.y_extra);
  k.rpb_float32 = a.rpb.dtype == DType::kFloat32;
  k.alpha = a.alpha;
  k.masked = a.masked;
  k.x = {a.x.data, detail::token_layout(a.x, p.rank)};
  k.y = {a.y.data, detail::token_layout(a.y, p.rank)};
  k.y_extra = {a.y_extra.data, detail::token_layout(a.y_extra, 1)};
  k.rpb = a.rpb.data;
  k.rpb_layout = detail::rpb_layout(a.rpb, p.rank);
  k.out = {a.out.data, detail::token_layout(a.out, p.rank)};
  return dispatch_types(p.dtype, a.out.dtype, [&](auto t, auto w) -> Status {
    pn_kernel<decltype(t), decltype(w)><<<blocks_for(k.rows * lanes), kBlock, 0, stream>>>(k);
    return launch_status("naive pn kernel");
  });
}

}  // namespace nbhd::cuda::naive
