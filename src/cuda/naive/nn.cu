// SPDX-License-Identifier: Apache-2.0
// NN (neighborhood-neighborhood, "AV"): out[q, h] = alpha * sum over the window slots
// and the additional tokens of w[q, h, slot] * y[key, h / G]. The output when w =
// probs, y = v; d query when w = d scores, y = k, alpha = scale.
#include "cuda/common/check.hpp"
#include "cuda/naive/device.cuh"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/walk.hpp"

namespace nbhd::cuda::naive {
namespace {

struct NnParams {
  Neighborhood nb;
  int64_t rows;   // batch * query tokens * heads
  TokenBox box;   // the query rows (weights and out are the box's tensors)
  int64_t heads, heads_per_kv;
  LaneGroup group;
  int dim, chunks;  // output elements per row, and their chunks
  int window;       // W: slot of the first additional token
  int extra;        // M
  bool vectorized;
  float alpha;
  In weights, y, y_extra;
  Out out;
};

// A row (query, head) belongs to `lanes` lanes, each owning 8 output elements (a
// chunk), so no reduction between lanes: per neighbor a group reads one y row
// together and the row's weight once (the same address for the whole group).
template <class T, class A>
__global__ void __launch_bounds__(kBlock) nn_kernel(const __grid_constant__ NnParams p) {
  const A* weights = static_cast<const A*>(p.weights.data);
  const T* y = static_cast<const T*>(p.y.data);
  const T* y_extra = static_cast<const T*>(p.y_extra.data);
  T* out = static_cast<T*>(p.out.data);

  for_each_row(p.rows, p.group, [&](int64_t row, int sub) {
    const RowIndex r = decode_row(row, p.box, p.heads);
    const int64_t hk = divide(r.head, p.heads_per_kv);
    const A* w_row = weights + p.weights.layout.offset(r.batch, r.box_token, r.head);
    const int64_t w_inner = p.weights.layout.inner;
    T* out_row = out + p.out.layout.offset(r.batch, r.box_token, r.head);
    const Neighborhood::Windows win = p.nb.windows(r.token);

    for (int c = sub; c < p.chunks; c += p.group.lanes) {
      const int n = chunk_size(c, p.dim);
      float acc[kChunk] = {};
      auto add = [&](float weight, const T* y_row, int64_t y_inner) {
        float v[kChunk];
        load_chunk(y_row, y_inner, c, n, p.vectorized, v);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) acc[i] = fmaf(weight, v[i], acc[i]);
      };
      for_each_neighbor(p.nb, win, [&](int slot, const int* key) {
        add(to_float(w_row[slot * w_inner]), y + p.y.layout.offset(r.batch, key, hk), p.y.layout.inner);
      });
      for (int m = 0; m < p.extra; ++m) {
        const int token[kMaxRank] = {0, 0, m};
        add(to_float(w_row[(p.window + m) * w_inner]), y_extra + p.y_extra.layout.offset(r.batch, token, hk),
            p.y_extra.layout.inner);
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[i] *= p.alpha;
      store_chunk(out_row, p.out.layout.inner, c, n, p.vectorized, acc);
    }
  });
}

}  // namespace

Status nn(const Problem& p, const NnArgs& a, cudaStream_t stream) {
  NnParams k{};
  k.nb = p.neighborhood();
  k.rows = weight_rows(p);
  k.box = query_box(p);
  k.heads = p.heads;
  k.heads_per_kv = p.heads_per_kv();
  k.dim = int(a.out.shape[a.out.ndim - 1]);
  k.chunks = int(ceil_div64(k.dim, kChunk));
  const int lanes = lanes_for(k.chunks);
  k.group = {lanes, log2_exact(lanes)};
  k.window = int(p.window_size());
  k.extra = int(p.additional_tokens);
  k.vectorized = rows_vectorizable(a.y) && rows_vectorizable(a.y_extra) && rows_vectorizable(a.out);
  k.alpha = a.alpha;
  k.weights = {a.weights.data, detail::token_layout(a.weights, p.rank)};
  k.y = {a.y.data, detail::token_layout(a.y, p.rank)};
  k.y_extra = {a.y_extra.data, detail::token_layout(a.y_extra, 1)};
  k.out = {a.out.data, detail::token_layout(a.out, p.rank)};
  return dispatch_types(p.dtype, a.weights.dtype, [&](auto t, auto w) -> Status {
    nn_kernel<decltype(t), decltype(w)><<<blocks_for(k.rows * lanes), kBlock, 0, stream>>>(k);
    return launch_status("naive nn kernel");
  });
}

}  // namespace nbhd::cuda::naive
