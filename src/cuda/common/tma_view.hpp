// SPDX-License-Identifier: Apache-2.0
// How a tile of a heads-last token tensor [B, X0, X1, X2, H, D] is one TMA copy
// (cp.async.bulk.tensor) per slab of columns: the tensor map's dims, extents,
// strides, box and traversal strides, built from the caller's strides, so that a
// query or key tile (a box of one dilation group, for one batch and head) needs no
// token permutation pass. Host code plans the view; the coordinates of a tile are
// host and device code. The Hopper kernels' producers build their tensor maps from
// it (cuTensorMapEncodeTiled takes these arrays as they are).
//
// The view, innermost dim first (at most 5, the limit of a tensor map):
//   columns   D, or H x D where the heads are contiguous to the features (head
//             stride == D): a box of `box_cols` never crosses a head then, and the
//             heads need no dim of their own;
//   axes      2, 1, 0 (all but padded ones), each over the whole axis with traversal
//             stride = dilation: a box of n * d tokens from g + d * j0 loads the n
//             tokens g + d * (j0 + k) of dilation group g, and TMA zero-fills those
//             past the axis (d <= 8, n * d <= 256: TMA's limits);
//   heads     where not folded into the columns;
//   batch     where B > 1.
// A layout the view cannot express gets a reason (and the kernel keeps its cp.async
// producer): more than 5 dims, a stride that is not a multiple of 16 bytes, a
// dilation over 8, a box over 256 elements.
#pragma once

#include <cstdint>
#include <string>

#include "core/layout.hpp"
#include "nbhd/core/window.hpp"

namespace nbhd::cuda {

constexpr int kTmaMaxDims = 5;
constexpr int kTmaMaxBox = 256;          // elements per box dim
constexpr int kTmaMaxElementStride = 8;  // traversal stride

struct TmaView {
  enum class Dim : int8_t { kColumns, kAxis0, kAxis1, kAxis2, kHeads, kBatch };
  int dims = 0;
  Dim what[kTmaMaxDims] = {};
  uint64_t extent[kTmaMaxDims] = {};        // elements
  uint64_t stride_bytes[kTmaMaxDims] = {};  // dim 0: the element size (contiguous)
  uint32_t box[kTmaMaxDims] = {};
  uint32_t element_stride[kTmaMaxDims] = {};
  bool heads_folded = false;
  int64_t columns = 0;  // D: the columns of one head
};

// A tile: batch b, head h, per axis its dilation group and the group indices
// [origin, origin + box) (padded axes: group 0, origin 0), and one slab of columns.
struct TmaTile {
  int64_t batch = 0, head = 0;
  int group[kMaxRank] = {};
  int origin[kMaxRank] = {};
  int slab = 0;
};

// The view of a tensor with `layout` (element strides, detail::token_layout) over
// the grid and dilations of `nb`, for tiles of `tile[a]` group indices per axis and
// `box_cols` columns per copy. Returns "" and fills *view, or the reason it cannot.
inline std::string plan_tma_view(const detail::TokenLayout& layout, const Neighborhood& nb, int64_t batch,
                                 int64_t heads, int64_t columns, int element_bytes, const int* tile, int box_cols,
                                 TmaView* view) {
  TmaView v;
  v.columns = columns;
  const int64_t e = element_bytes;
  if (columns % box_cols != 0)
    return "the head dim " + std::to_string(columns) + " is not a multiple of the " + std::to_string(box_cols) +
           "-column copies";
  if (int64_t(box_cols) * e > 128) return "a copy of " + std::to_string(box_cols) + " columns exceeds the 128-byte swizzle";
  if (layout.inner != 1) return "the features are not contiguous (stride " + std::to_string(layout.inner) + ")";
  auto add = [&](TmaView::Dim what, int64_t extent, int64_t stride, int64_t box, int64_t element_stride) -> std::string {
    if (v.dims == kTmaMaxDims)
      return "the tile needs more than " + std::to_string(kTmaMaxDims) + " tensor-map dims (heads not contiguous to "
             "the features, a rank-3 grid and a batch)";
    if (v.dims > 0 && (stride * e) % 16 != 0)
      return "a stride of " + std::to_string(stride * e) + " bytes is not a multiple of 16";
    if (box > kTmaMaxBox) return "a box of " + std::to_string(box) + " elements exceeds " + std::to_string(kTmaMaxBox);
    v.what[v.dims] = what;
    v.extent[v.dims] = uint64_t(extent);
    v.stride_bytes[v.dims] = uint64_t(v.dims == 0 ? e : stride * e);
    v.box[v.dims] = uint32_t(box);
    v.element_stride[v.dims] = uint32_t(element_stride);
    ++v.dims;
    return "";
  };
  std::string why;
  v.heads_folded = heads == 1 || layout.head == columns;
  why = add(TmaView::Dim::kColumns, v.heads_folded ? heads * columns : columns, 1, box_cols, 1);
  for (int a = kMaxRank - 1; a >= 0 && why.empty(); --a) {
    const Axis& ax = nb.axis[a];
    if (ax.length <= 1 && tile[a] <= 1) continue;  // a padded axis: coordinate 0, nothing to zero-fill
    if (ax.dilation > kTmaMaxElementStride)
      return "dilation " + std::to_string(ax.dilation) + " on axis " + std::to_string(a) + " exceeds TMA's traversal "
             "stride of " + std::to_string(kTmaMaxElementStride);
    why = add(TmaView::Dim(int(TmaView::Dim::kAxis0) + a), ax.length, layout.axis[a], int64_t(tile[a]) * ax.dilation,
              ax.dilation);
  }
  if (why.empty() && !v.heads_folded) why = add(TmaView::Dim::kHeads, heads, layout.head, 1, 1);
  if (why.empty() && batch > 1) why = add(TmaView::Dim::kBatch, batch, layout.batch, 1, 1);
  if (why.empty()) *view = v;
  return why;
}

// The box's first element in the view's coordinates (innermost first). Unrolled,
// with every array index a constant: a runtime index into the tile or the
// coordinates put them in local memory, and the TMA producer's thread spent its
// time on those loads (ncu, H200: the forward 1.37x slower than with cp.async).
NBHD_HOST_DEVICE void tma_coordinates(const TmaView& v, const Neighborhood& nb, const TmaTile& t,
                                      int32_t* coordinates) {
#pragma unroll
  for (int i = 0; i < kTmaMaxDims; ++i) {
    int64_t c = 0;
    switch (v.what[i]) {
      case TmaView::Dim::kColumns:
        c = (v.heads_folded ? t.head * v.columns : 0) + int64_t(t.slab) * v.box[0];
        break;
      case TmaView::Dim::kHeads: c = t.head; break;
      case TmaView::Dim::kBatch: c = t.batch; break;
      case TmaView::Dim::kAxis0: c = t.group[0] + int64_t(nb.axis[0].dilation) * t.origin[0]; break;
      case TmaView::Dim::kAxis1: c = t.group[1] + int64_t(nb.axis[1].dilation) * t.origin[1]; break;
      case TmaView::Dim::kAxis2: c = t.group[2] + int64_t(nb.axis[2].dilation) * t.origin[2]; break;
    }
    coordinates[i] = i < v.dims ? int32_t(c) : 0;
  }
}

}  // namespace nbhd::cuda
