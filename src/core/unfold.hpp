// SPDX-License-Identifier: Apache-2.0
// Short dilation groups, unfolded into an extra axis.
//
// On an axis of length L with dilation d, token i = j * d + g is position j of group g
// (spec, "One axis"). A tiled backend gives every group its own query tiles, so when
// groups are short (2048 tokens at dilation 520: 4 tokens per group) almost every
// tile row is empty: on the H200 paper grid the fused and gemm backends ran 3-5x
// slower than naive there (docs/performance.md). The same tokens are the rows of a
// ceil(L / d) x d grid, row-major, with the window on the row axis J and kernel 1 on
// the group axis G; a tile then spans many groups. Only groups of equal length form
// such a grid, so an axis with L % d = r != 0 gives two parts: groups [0, r) of
// length ceil(L / d) and groups [r, d) of length floor(L / d). Each part is an exact
// problem of its own over strided views of the caller's tensors (J stride = d times
// the axis stride, G stride = the axis stride); no data moves.
#pragma once

#include <vector>

#include "nbhd/api.hpp"

namespace nbhd::detail {

// An axis whose groups are shorter than this fills less than one 16-query warp box of
// a 1-D tile, and only a dilation group of fewer tokens than kSmallGroup (half a
// 64-query tile) is worth unfolding: a larger one already fills most of a tile the
// planner can shape to it (DiNAT's 7x7 groups fill 49 of an 8x8 tile), and its
// unfolding is not measured. Both unfolded problems measured on an H200 (groups of 3-6
// tokens in 1-D, 4x4 in 2-D) ran 1.6-9x faster (docs/performance.md).
inline constexpr int64_t kShortGroup = 16;
inline constexpr int64_t kSmallGroup = 32;

// One part of an unfolded problem: its problem (each unfolded axis a of the original
// becomes two adjacent axes, J then G), and per axis of the original whether it was
// unfolded and the first group the part covers.
struct UnfoldedPart {
  Problem problem;
  bool unfolded[3] = {};
  int64_t first_group[3] = {};
};

// The parts to run instead of `p`, or an empty list when unfolding does not apply:
// `p` has a query sub-box, a dilation group holds kSmallGroup tokens or more, no axis
// has dilation > 1 with groups shorter than kShortGroup, or the rank has no room
// (rank + unfolded axes <= 3; the shortest groups go first). With
// `single_part_only`, only unfoldings that leave one part (L % d == 0 on every
// unfolded axis): gradients that sum over all queries (d rpb, additional tokens)
// would otherwise be split between parts.
std::vector<UnfoldedPart> unfold_short_groups(const Problem& p, bool single_part_only);

// The view of a token tensor [B, X..., H(, D)] (q, k, v, out, lse and their
// gradients) for one part; undefined tensors stay undefined.
TensorRef token_view(const TensorRef& t, const Problem& original, const UnfoldedPart& part);
// The view of rpb [H, 2k-1, ...] (or d rpb): a size-1 G axis after each unfolded one.
TensorRef rpb_view(const TensorRef& t, const Problem& original, const UnfoldedPart& part);

ForwardTensors part_tensors(const ForwardTensors& t, const Problem& original, const UnfoldedPart& part);
BackwardTensors part_tensors(const BackwardTensors& t, const Problem& original, const UnfoldedPart& part);

}  // namespace nbhd::detail
