// SPDX-License-Identifier: Apache-2.0
// Row-wise softmax over the W + M slots of each (query, head), and its backward
// d scores = probs * (d probs - <probs, d probs> + d lse) (d lse: the gradient of
// the row's lse where the loss uses it, else 0). A row belongs to `lanes` lanes
// (slots strided by `lanes`: a warp's loads are consecutive), reduced with shuffles.
// Each element is read, then written, by one lane: in place is safe.
#include <cmath>

#include "cuda/common/check.hpp"
#include "cuda/naive/device.cuh"
#include "cuda/naive/ops.hpp"
#include "cuda/naive/walk.hpp"

namespace nbhd::cuda::naive {
namespace {

struct RowParams {
  int64_t rows;  // batch * query tokens * heads
  TokenBox box;  // the query rows (every tensor here is the box's)
  int64_t heads;
  LaneGroup group;
  int slots;  // W + M
  In a, b;    // softmax: scores (b unused); backward: probs, d probs
  Out out;    // probs; d scores
  float* lse;  // softmax: the rows' lse out; backward: lse's gradient in; optional
  detail::TokenLayout lse_layout;
};

template <class A>
__global__ void __launch_bounds__(kBlock) softmax_kernel(const __grid_constant__ RowParams p) {
  const int lanes = p.group.lanes;
  for_each_row_uniform(p.rows, p.group, [&](int64_t row, int sub, bool active) {
    const RowIndex r = decode_row(row, p.box, p.heads);
    const A* in = static_cast<const A*>(p.a.data) + p.a.layout.offset(r.batch, r.box_token, r.head);
    A* out = static_cast<A*>(p.out.data) + p.out.layout.offset(r.batch, r.box_token, r.head);
    const int64_t in_inner = p.a.layout.inner, out_inner = p.out.layout.inner;

    float mx = -INFINITY;
    for (int s = sub; active && s < p.slots; s += lanes) mx = fmaxf(mx, to_float(in[s * in_inner]));
    mx = group_max(mx, lanes);
    float sum = 0.f;
    for (int s = sub; active && s < p.slots; s += lanes) sum += expf(to_float(in[s * in_inner]) - mx);
    sum = group_sum(sum, lanes);
    // Slots outside a causal window hold -inf: exp gives 0. Every row has a finite
    // score (a query always sees at least itself), so mx is finite.
    for (int s = sub; active && s < p.slots; s += lanes)
      out[s * out_inner] = from_float<A>(expf(to_float(in[s * in_inner]) - mx) / sum);
    if (active && sub == 0 && p.lse) p.lse[p.lse_layout.offset(r.batch, r.box_token, r.head)] = mx + logf(sum);
  });
}

template <class A>
__global__ void __launch_bounds__(kBlock) softmax_backward_kernel(const __grid_constant__ RowParams p) {
  const int lanes = p.group.lanes;
  for_each_row_uniform(p.rows, p.group, [&](int64_t row, int sub, bool active) {
    const RowIndex r = decode_row(row, p.box, p.heads);
    const A* probs = static_cast<const A*>(p.a.data) + p.a.layout.offset(r.batch, r.box_token, r.head);
    const A* d_probs = static_cast<const A*>(p.b.data) + p.b.layout.offset(r.batch, r.box_token, r.head);
    A* out = static_cast<A*>(p.out.data) + p.out.layout.offset(r.batch, r.box_token, r.head);
    const int64_t p_inner = p.a.layout.inner, g_inner = p.b.layout.inner, out_inner = p.out.layout.inner;

    float dot = 0.f;
    for (int s = sub; active && s < p.slots; s += lanes)
      dot = fmaf(to_float(probs[s * p_inner]), to_float(d_probs[s * g_inner]), dot);
    dot = group_sum(dot, lanes);
    if (active && p.lse) dot -= p.lse[p.lse_layout.offset(r.batch, r.box_token, r.head)];
    for (int s = sub; active && s < p.slots; s += lanes)
      out[s * out_inner] = from_float<A>(to_float(probs[s * p_inner]) * (to_float(d_probs[s * g_inner]) - dot));
  });
}

RowParams row_params(const Problem& p) {
  RowParams k{};
  k.rows = weight_rows(p);
  k.box = query_box(p);
  k.heads = p.heads;
  k.slots = int(weight_slots(p));
  const int lanes = lanes_for(k.slots);
  k.group = {lanes, log2_exact(lanes)};
  return k;
}

}  // namespace

Status softmax(const Problem& p, const TensorRef& scores, const TensorRef& probs, const TensorRef& lse,
               cudaStream_t stream) {
  RowParams k = row_params(p);
  k.a = {scores.data, detail::token_layout(scores, p.rank)};
  k.out = {probs.data, detail::token_layout(probs, p.rank)};
  k.lse = static_cast<float*>(lse.data);
  k.lse_layout = detail::token_layout(lse, p.rank, /*has_inner=*/false);
  return dispatch_types(p.dtype, scores.dtype, [&](auto, auto w) -> Status {
    softmax_kernel<decltype(w)><<<blocks_for(k.rows * k.group.lanes), kBlock, 0, stream>>>(k);
    return launch_status("naive softmax kernel");
  });
}

Status softmax_backward(const Problem& p, const TensorRef& probs, const TensorRef& d_probs, const TensorRef& d_scores,
                        const TensorRef& d_lse, cudaStream_t stream) {
  RowParams k = row_params(p);
  k.a = {probs.data, detail::token_layout(probs, p.rank)};
  k.b = {d_probs.data, detail::token_layout(d_probs, p.rank)};
  k.out = {d_scores.data, detail::token_layout(d_scores, p.rank)};
  k.lse = static_cast<float*>(d_lse.data);
  k.lse_layout = detail::token_layout(d_lse, p.rank, /*has_inner=*/false);
  return dispatch_types(p.dtype, probs.dtype, [&](auto, auto w) -> Status {
    softmax_backward_kernel<decltype(w)><<<blocks_for(k.rows * k.group.lanes), kBlock, 0, stream>>>(k);
    return launch_status("naive softmax backward kernel");
  });
}

}  // namespace nbhd::cuda::naive
