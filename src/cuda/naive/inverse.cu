// SPDX-License-Identifier: Apache-2.0
// IN (inverse-neighborhood): out[k, hkv] = alpha * sum of w[q, h, slot] * x[q, h] over
// the queries q whose windows hold key k (Axis::inverse_window, a closed form) and
// the heads h of kv head hkv's group, slot being k's slot in q's window. d value when
// w = probs, x = d out; d key when w = d scores, x = q, alpha = scale.
#include "cuda/common/check.hpp"
#include "cuda/naive/device.cuh"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/walk.hpp"

namespace nbhd::cuda::naive {
namespace {

struct InverseParams {
  Neighborhood nb;
  int64_t rows;    // batch * tokens * kv_heads
  TokenBox grid;   // the key rows
  TokenBox box;    // the queries (weights and x are the box's tensors)
  int64_t kv_heads, heads_per_kv;
  LaneGroup group;
  int dim, chunks;  // elements of x and out per row, and their chunks
  bool vectorized;
  float alpha;
  In weights, x;
  Out out;
};

// A key row belongs to `lanes` lanes, each owning 8 output elements; each row is
// written once, by its own lanes: no atomics, deterministic.
template <class T, class A>
__global__ void __launch_bounds__(kBlock) inverse_kernel(const __grid_constant__ InverseParams p) {
  const A* weights = static_cast<const A*>(p.weights.data);
  const T* x = static_cast<const T*>(p.x.data);
  T* out = static_cast<T*>(p.out.data);

  for_each_row(p.rows, p.group, [&](int64_t row, int sub) {
    const RowIndex r = decode_row(row, p.grid, p.kv_heads);  // r.token is the key, r.head its kv head
    const int64_t first_head = r.head * p.heads_per_kv;
    T* out_row = out + p.out.layout.offset(r.batch, r.token, r.head);

    for (int c = sub; c < p.chunks; c += p.group.lanes) {
      const int n = chunk_size(c, p.dim);
      float acc[kChunk] = {};
      for_each_inverse_neighbor(p.nb, r.token, [&](const int* query, int slot) {
        if (!p.box.contains(query)) return;  // a query outside the sub-box: not computed
        int q[kMaxRank];
        for (int a = 0; a < kMaxRank; ++a) q[a] = query[a] - p.box.begin[a];
        for (int64_t h = first_head; h < first_head + p.heads_per_kv; ++h) {
          const float weight =
              to_float(weights[p.weights.layout.offset(r.batch, q, h) + slot * p.weights.layout.inner]);
          float v[kChunk];
          load_chunk(x + p.x.layout.offset(r.batch, q, h), p.x.layout.inner, c, n, p.vectorized, v);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) acc[i] = fmaf(weight, v[i], acc[i]);
        }
      });
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[i] *= p.alpha;
      store_chunk(out_row, p.out.layout.inner, c, n, p.vectorized, acc);
    }
  });
}

}  // namespace

Status inverse(const Problem& p, const InverseArgs& a, cudaStream_t stream) {
  InverseParams k{};
  k.nb = p.neighborhood();
  k.rows = p.batch * p.tokens() * p.kv_heads;
  k.grid = whole_grid(k.nb);
  k.box = query_box(p);
  k.kv_heads = p.kv_heads;
  k.heads_per_kv = p.heads_per_kv();
  k.dim = int(a.out.shape[a.out.ndim - 1]);
  k.chunks = int(ceil_div64(k.dim, kChunk));
  const int lanes = lanes_for(k.chunks);
  k.group = {lanes, log2_exact(lanes)};
  k.vectorized = rows_vectorizable(a.x) && rows_vectorizable(a.out);
  k.alpha = a.alpha;
  k.weights = {a.weights.data, detail::token_layout(a.weights, p.rank)};
  k.x = {a.x.data, detail::token_layout(a.x, p.rank)};
  k.out = {a.out.data, detail::token_layout(a.out, p.rank)};
  return dispatch_types(p.dtype, a.weights.dtype, [&](auto t, auto w) -> Status {
    inverse_kernel<decltype(t), decltype(w)><<<blocks_for(k.rows * lanes), kBlock, 0, stream>>>(k);
    return launch_status("naive inverse kernel");
  });
}

}  // namespace nbhd::cuda::naive
