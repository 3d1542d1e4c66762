// SPDX-License-Identifier: Apache-2.0
// The TMA view of a token tensor (cuda/common/tma_view.hpp): a copy through the view,
// with TMA's semantics (traversal strides, zero fill outside the tensor), loads
// exactly the tile's tokens of one dilation group, batch and head, and the layouts
// it cannot express are refused with the reason.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "cuda/common/tma_view.hpp"

namespace nbhd::cuda {
namespace {

struct Tensor {
  std::vector<int64_t> extent;  // B, X0, X1, X2, H, D (axes padded to 3)
  detail::TokenLayout layout;   // element strides
  std::vector<float> data;
  int64_t at(int64_t b, const int* token, int64_t h, int64_t col) const {
    return layout.offset(b, token, h) + col * layout.inner;
  }
};

// B x X x H x D with each head row `head_pad` and each token `token_pad` elements
// longer than it needs (padded strides), random values.
Tensor make_tensor(std::mt19937_64& rng, int64_t batch, const int* x, int64_t heads, int64_t dim, int64_t head_pad,
                   int64_t token_pad) {
  Tensor t;
  t.extent = {batch, x[0], x[1], x[2], heads, dim};
  t.layout.inner = 1;
  t.layout.head = dim + head_pad;
  t.layout.axis[2] = heads * t.layout.head + token_pad;
  t.layout.axis[1] = x[2] * t.layout.axis[2];
  t.layout.axis[0] = x[1] * t.layout.axis[1];
  t.layout.batch = x[0] * t.layout.axis[0];
  t.data.resize(size_t(batch * t.layout.batch));
  std::uniform_real_distribution<float> u(1.f, 2.f);  // never 0: a zero fill shows
  for (float& f : t.data) f = u(rng);
  return t;
}

// One copy through the view as TMA performs it: per dim, ceil(box / traversal
// stride) elements from the coordinate on, zero where any coordinate is outside
// the dim. Result indexed by the per-dim element indices, innermost fastest.
std::vector<float> tma_copy(const Tensor& t, const TmaView& v, const int32_t* start, std::vector<int>* counts) {
  counts->assign(size_t(v.dims), 0);
  size_t total = 1;
  for (int i = 0; i < v.dims; ++i) {
    (*counts)[size_t(i)] = int((v.box[i] + v.element_stride[i] - 1) / v.element_stride[i]);
    total *= size_t((*counts)[size_t(i)]);
  }
  std::vector<float> out(total);
  const int64_t e = int64_t(v.stride_bytes[0]);
  for (size_t n = 0; n < total; ++n) {
    size_t rest = n;
    bool inside = true;
    int64_t bytes = 0;
    for (int i = 0; i < v.dims; ++i) {
      const int64_t k = int64_t(rest % size_t((*counts)[size_t(i)]));
      rest /= size_t((*counts)[size_t(i)]);
      const int64_t c = start[i] + k * v.element_stride[i];
      inside &= c >= 0 && c < int64_t(v.extent[i]);
      bytes += c * int64_t(v.stride_bytes[i]);
    }
    out[n] = inside ? t.data[size_t(bytes / e)] : 0.f;
  }
  return out;
}

TEST(TmaView, ACopyLoadsTheTilesTokensOfOneGroup) {
  std::mt19937_64 rng(71);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int checked = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int rank = uniform(1, 3);
    int x[kMaxRank] = {1, 1, 1}, tile[kMaxRank] = {1, 1, 1};
    Neighborhood nb;
    for (int a = kMaxRank - rank; a < kMaxRank; ++a) {
      nb.axis[a].dilation = uniform(1, 4) == 4 ? uniform(5, 8) : uniform(1, 3);
      x[a] = uniform(nb.axis[a].dilation, 24);
      nb.axis[a].length = x[a];
      tile[a] = uniform(1, 8);
    }
    const int64_t batch = uniform(1, 3), dim = uniform(0, 1) ? 64 : 128, box_cols = 64;
    // Rank 3 with separate heads and a batch needs 6 dims: keep the heads packed there.
    const bool pad_heads = uniform(0, 2) == 0 && !(rank == 3 && batch > 1);
    const int64_t heads = uniform(1, 3), head_pad = pad_heads ? 8 * uniform(1, 2) : 0;
    const Tensor t = make_tensor(rng, batch, x, heads, dim, head_pad, 8 * uniform(0, 1));
    TmaView v;
    const std::string why = plan_tma_view(t.layout, nb, batch, heads, dim, /*element_bytes=*/2, tile, box_cols, &v);
    ASSERT_EQ(why, "") << "trial " << trial;
    ASSERT_LE(v.dims, kTmaMaxDims);
    for (int tries = 0; tries < 4; ++tries) {
      TmaTile tt;
      tt.batch = uniform(0, int(batch) - 1);
      tt.head = uniform(0, int(heads) - 1);
      tt.slab = uniform(0, int(dim / box_cols) - 1);
      for (int a = 0; a < kMaxRank; ++a) {
        tt.group[a] = uniform(0, nb.axis[a].dilation - 1);
        tt.origin[a] = uniform(0, nb.axis[a].group_length(tt.group[a]) - 1);
      }
      int32_t start[kTmaMaxDims];
      tma_coordinates(v, nb, tt, start);
      std::vector<int> counts;
      const std::vector<float> got = tma_copy(t, v, start, &counts);
      // Every element of the tile, gathered directly: token g + d (origin + k) of
      // each axis, zero past the axis.
      for (int k0 = 0; k0 < tile[0]; ++k0)
        for (int k1 = 0; k1 < tile[1]; ++k1)
          for (int k2 = 0; k2 < tile[2]; ++k2)
            for (int c = 0; c < box_cols; ++c) {
              const int k[kMaxRank] = {k0, k1, k2};
              int token[kMaxRank];
              bool inside = true;
              for (int a = 0; a < kMaxRank; ++a) {
                token[a] = tt.group[a] + nb.axis[a].dilation * (tt.origin[a] + k[a]);
                inside &= token[a] < x[a];
              }
              const float want =
                  inside ? t.data[size_t(t.at(tt.batch, token, tt.head, int64_t(tt.slab) * box_cols + c))] : 0.f;
              size_t n = 0, scale = 1;
              for (int i = 0; i < v.dims; ++i) {
                const int a = int(v.what[i]) - int(TmaView::Dim::kAxis0);
                const int index = v.what[i] == TmaView::Dim::kColumns ? c : (a >= 0 && a < kMaxRank) ? k[a] : 0;
                n += size_t(index) * scale;
                scale *= size_t(counts[size_t(i)]);
              }
              ASSERT_EQ(got[n], want) << "trial " << trial << " token offset " << k0 << "," << k1 << "," << k2
                                      << " column " << c;
              ++checked;
            }
    }
  }
  EXPECT_GT(checked, 100000);
}

TEST(TmaView, WhatItCannotExpressIsRefusedWithTheReason) {
  std::mt19937_64 rng(72);
  const int tile[kMaxRank] = {4, 4, 8};
  auto plan = [&](int batch, const int* x, int heads, int head_pad, int token_pad, int dilation) {
    const Tensor t = make_tensor(rng, batch, x, heads, 64, head_pad, token_pad);
    Neighborhood nb;
    for (int a = 0; a < kMaxRank; ++a) {
      nb.axis[a].length = x[a];
      nb.axis[a].dilation = a == 2 ? dilation : 1;
    }
    TmaView v;
    return plan_tma_view(t.layout, nb, batch, heads, 64, 2, tile, 64, &v);
  };
  const int grid3[kMaxRank] = {6, 8, 40}, grid1[kMaxRank] = {1, 1, 300};
  EXPECT_EQ(plan(2, grid3, 4, 0, 0, 1), "");  // heads packed: 5 dims
  EXPECT_NE(plan(2, grid3, 4, 8, 0, 1).find("more than 5 tensor-map dims"), std::string::npos);
  EXPECT_EQ(plan(1, grid3, 4, 8, 0, 1), "");  // one batch: no batch dim
  EXPECT_NE(plan(1, grid1, 2, 4, 0, 1).find("not a multiple of 16"), std::string::npos);  // 8-byte head pad
  EXPECT_NE(plan(1, grid1, 2, 0, 0, 9).find("dilation 9 on axis 2"), std::string::npos);
  // 40 tokens at dilation 8: a box of 320 elements.
  const int wide[kMaxRank] = {1, 1, 40};
  const Tensor t = make_tensor(rng, 1, grid1, 2, 64, 0, 0);
  Neighborhood nb;
  nb.axis[2].length = 300;
  nb.axis[2].dilation = 8;
  TmaView v;
  EXPECT_NE(plan_tma_view(t.layout, nb, 1, 2, 64, 2, wide, 64, &v).find("a box of 320 elements"), std::string::npos);
}

}  // namespace
}  // namespace nbhd::cuda
