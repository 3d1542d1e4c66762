// SPDX-License-Identifier: Apache-2.0
#include "core/unfold.hpp"

#include <algorithm>

namespace nbhd::detail {
namespace {

// Groups [first, first + count) of one axis, each `length` long.
struct GroupRange {
  int64_t length = 0, count = 0, first = 0;
};

Problem part_problem(const Problem& p, const bool* unfolded, const GroupRange* range) {
  Problem q = p;
  int n = 0;
  for (int a = 0; a < p.rank; ++a) {
    if (!unfolded[a]) {
      q.extent[n] = p.extent[a], q.kernel[n] = p.kernel[a], q.dilation[n] = p.dilation[a];
      q.stride[n] = p.stride[a], q.causal[n] = p.causal[a], q.periodic[n] = p.periodic[a];
      ++n;
      continue;
    }
    // J: the position inside a group, where the window, stride and causality live.
    q.extent[n] = range[a].length, q.kernel[n] = p.kernel[a], q.dilation[n] = 1;
    q.stride[n] = p.stride[a], q.causal[n] = p.causal[a], q.periodic[n] = p.periodic[a];
    ++n;
    // G: the group; each query attends to its own group only.
    q.extent[n] = range[a].count, q.kernel[n] = 1, q.dilation[n] = 1, q.stride[n] = 1, q.causal[n] = false;
    q.periodic[n] = false;
    ++n;
  }
  q.rank = n;
  return q;
}

// Copies dims [from, to) of `t` into `out`, appending.
void copy_dims(const TensorRef& t, int from, int to, TensorRef* out) {
  for (int i = from; i < to; ++i) {
    out->shape[out->ndim] = t.shape[i];
    out->stride[out->ndim] = t.stride[i];
    ++out->ndim;
  }
}

// `t`'s data, dtype and device, with no dims yet.
TensorRef dimensionless_copy(const TensorRef& t) {
  TensorRef v = t;
  v.ndim = 0;
  return v;
}

}  // namespace

std::vector<UnfoldedPart> unfold_short_groups(const Problem& p, bool single_part_only) {
  struct Candidate {
    int axis;
    int64_t group_length;
  };
  // The query-side tensors of a sub-box hold the box's tokens only, which the
  // unfolded parts' views (strides over the whole grid) do not describe.
  if (p.has_query_box()) return {};
  int64_t group_tokens = 1;  // of the largest dilation group
  for (int a = 0; a < p.rank; ++a) group_tokens *= (p.extent[a] + p.dilation[a] - 1) / p.dilation[a];
  if (group_tokens >= kSmallGroup) return {};
  std::vector<Candidate> candidates;
  for (int a = 0; a < p.rank; ++a) {
    const int64_t L = p.extent[a], d = p.dilation[a];
    if (d <= 1) continue;
    const int64_t longest = (L + d - 1) / d;
    if (longest >= kShortGroup || (single_part_only && L % d != 0)) continue;
    candidates.push_back({a, longest});
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& x, const Candidate& y) { return x.group_length < y.group_length; });
  candidates.resize(std::min<size_t>(candidates.size(), size_t(3 - p.rank)));
  if (candidates.empty()) return {};

  bool unfolded[3] = {};
  for (const Candidate& c : candidates) unfolded[c.axis] = true;

  // Every combination of one group range per unfolded axis.
  std::vector<std::vector<GroupRange>> choices(1, std::vector<GroupRange>(3));
  for (int a = 0; a < p.rank; ++a) {
    if (!unfolded[a]) continue;
    const int64_t L = p.extent[a], d = p.dilation[a], q = L / d, r = L % d;
    std::vector<GroupRange> ranges;
    if (r > 0) ranges.push_back({q + 1, r, 0});
    ranges.push_back({q, d - r, r});
    std::vector<std::vector<GroupRange>> next;
    for (const auto& choice : choices)
      for (const GroupRange& range : ranges) {
        next.push_back(choice);
        next.back()[a] = range;
      }
    choices = std::move(next);
  }

  std::vector<UnfoldedPart> parts;
  for (const auto& choice : choices) {
    UnfoldedPart part;
    part.problem = part_problem(p, unfolded, choice.data());
    for (int a = 0; a < p.rank; ++a) {
      part.unfolded[a] = unfolded[a];
      part.first_group[a] = choice[a].first;
    }
    parts.push_back(part);
  }
  return parts;
}

TensorRef token_view(const TensorRef& t, const Problem& original, const UnfoldedPart& part) {
  if (!t.defined()) return t;
  TensorRef v = dimensionless_copy(t);
  copy_dims(t, 0, 1, &v);  // batch
  int64_t offset = 0;
  for (int a = 0; a < original.rank; ++a) {
    const int dim = 1 + a;
    if (!part.unfolded[a]) {
      copy_dims(t, dim, dim + 1, &v);
      continue;
    }
    const int j = v.ndim - 1;  // the part's J axis (problem axis j)
    v.shape[v.ndim] = part.problem.extent[j];
    v.stride[v.ndim] = t.stride[dim] * original.dilation[a];
    ++v.ndim;
    v.shape[v.ndim] = part.problem.extent[j + 1];
    v.stride[v.ndim] = t.stride[dim];
    ++v.ndim;
    offset += part.first_group[a] * t.stride[dim];
  }
  copy_dims(t, 1 + original.rank, t.ndim, &v);  // heads (and the feature dim)
  v.data = static_cast<char*>(t.data) + offset * size_of(t.dtype);
  return v;
}

TensorRef rpb_view(const TensorRef& t, const Problem& original, const UnfoldedPart& part) {
  if (!t.defined()) return t;
  TensorRef v = dimensionless_copy(t);
  copy_dims(t, 0, 1, &v);  // heads
  for (int a = 0; a < original.rank; ++a) {
    copy_dims(t, 1 + a, 2 + a, &v);
    if (!part.unfolded[a]) continue;
    v.shape[v.ndim] = 1;  // 2 * kernel 1 - 1 biases on G: always index 0
    v.stride[v.ndim] = 1;
    ++v.ndim;
  }
  return v;
}

ForwardTensors part_tensors(const ForwardTensors& t, const Problem& original, const UnfoldedPart& part) {
  ForwardTensors v = t;  // additional keys/values: every query's, unchanged
  for (TensorRef* x : {&v.query, &v.key, &v.value, &v.out, &v.lse}) *x = token_view(*x, original, part);
  v.rpb = rpb_view(t.rpb, original, part);
  return v;
}

BackwardTensors part_tensors(const BackwardTensors& t, const Problem& original, const UnfoldedPart& part) {
  BackwardTensors v = t;
  for (TensorRef* x : {&v.query, &v.key, &v.value, &v.out, &v.lse, &v.d_out, &v.d_query, &v.d_key, &v.d_value, &v.d_lse})
    *x = token_view(*x, original, part);
  v.rpb = rpb_view(t.rpb, original, part);
  v.d_rpb = rpb_view(t.d_rpb, original, part);
  return v;
}

}  // namespace nbhd::detail
