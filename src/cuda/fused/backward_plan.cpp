// SPDX-License-Identifier: Apache-2.0
#include "cuda/fused/backward_plan.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace nbhd::cuda::fused {

std::vector<TileConfig> backward_candidates(DType dtype, int rank, int head_dim) {
  std::vector<TileConfig> out;
  if (head_dim > 128) return out;
  for (const TileConfig& c : candidate_configs(dtype, rank, head_dim))
    if (c.warps == kBackwardWarps && c.block_kv == backward_cols(dtype, head_dim) && c.m_tiles == 1) out.push_back(c);
  return out;
}

PlanEstimate estimate_key_pass(const Problem& p, const TileConfig& c) {
  PlanEstimate e;
  e.config = c;
  const Neighborhood nb = p.neighborhood();
  const TileShape& s = c.shape;  // q_log2 / w_log2: the key tile and its warp boxes; k_log2: query tiles
  std::vector<int> origins[kMaxRank];  // of key tiles
  sample_tile_origins(nb, s, origins);
  int lg[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) lg[a] = nb.axis[a].group_length(0);
  for (int o0 : origins[0])
    for (int o1 : origins[1])
      for (int o2 : origins[2]) {
        const int origin[kMaxRank] = {o0, o1, o2};
        Range qbox[kMaxRank];
        for (int a = 0; a < kMaxRank; ++a) {
          const int last = std::min(origin[a] + s.q(a), lg[a]) - 1;
          qbox[a] = nb.axis[a].inverse_window_union({origin[a], last + 1}, lg[a]);
        }
        for (int w = 0; w < c.warps; ++w) {
          int off[kMaxRank];
          s.warp_offset(w, off);
          Range uni[kMaxRank];
          double needed = 1;
          bool idle = false;
          for (int a = 0; a < kMaxRank; ++a) {
            const int first = origin[a] + off[a], last = std::min(first + s.w(a), lg[a]) - 1;
            if (first > last) {
              idle = true;
              break;
            }
            uni[a] = nb.axis[a].inverse_window_union({first, last + 1}, lg[a]);
            double axis_needed = 0;
            for (int j = first; j <= last; ++j) axis_needed += nb.axis[a].inverse_window(j, lg[a]).size();
            needed *= axis_needed;
          }
          if (idle) continue;
          e.needed_pairs += needed;
          // Over the query tiles of the CTA's query box: chunks the warp computes,
          // and chunks of the tiles it does not skip (any chunk active).
          add_warp_chunks(s, qbox, uni, &e);
        }
      }
  // The forward's cost model (plan.cpp): charged_pairs, a per-tile overhead of 24
  // keys' worth. Every candidate has 4 warps and the same columns (backward_cols).
  const double charged = charged_pairs(e);
  e.cost = (e.needed_pairs > 0 ? charged / e.needed_pairs : 0) * (1.0 + 24.0 / c.block_kv);
  return e;
}

namespace {

template <class Estimate>
std::vector<PlanEstimate> ranked(const Problem& p, Estimate&& estimate_one) {
  std::vector<PlanEstimate> out;
  for (const TileConfig& c : backward_candidates(p.dtype, p.rank, head_dim_bucket(p.dim, p.value_dim())))
    out.push_back(estimate_one(p, c));
  std::stable_sort(out.begin(), out.end(), [](const PlanEstimate& a, const PlanEstimate& b) { return a.cost < b.cost; });
  return out;
}

}  // namespace

bool prefer_dq_pass(const Problem& p) {
  if (const char* forced = std::getenv("NBHD_FUSED_BACKWARD_DQ")) {
    if (std::string(forced) == "pass") return true;
    if (std::string(forced) == "atomics") return false;
  }
  return p.window_size() <= kDqPassMaxWindow;
}

BackwardPlan plan_backward(const Problem& p) {
  return {ranked(p, estimate_key_pass).front().config, ranked(p, estimate).front().config, prefer_dq_pass(p)};
}

std::vector<std::string> describe_backward_plan(const Problem& p) {
  std::vector<std::string> lines;
  const int bucket = head_dim_bucket(p.dim, p.value_dim());
  if (backward_candidates(p.dtype, p.rank, bucket).empty()) {
    lines.push_back("fused backward: runs max(dim, dim_v) <= 128, got " + std::to_string(std::max(p.dim, p.value_dim())));
    return lines;
  }
  for (int pass = 0; pass < 2; ++pass) {
    const auto list = pass == 0 ? ranked(p, estimate_key_pass) : ranked(p, estimate);
    for (size_t i = 0; i < list.size(); ++i) {
      const PlanEstimate& e = list[i];
      const TileShape& s = e.config.shape;
      char buf[256];
      std::snprintf(buf, sizeof buf, "fused backward %s %s rows %dx%dx%d warp %dx%dx%d cols %dx%dx%d (d %d): %.2fx pairs  [%s]",
                    pass == 0 ? "key pass" : "dq pass ", i == 0 ? "CHOSEN  " : "rejected", s.q(0), s.q(1), s.q(2), s.w(0),
                    s.w(1), s.w(2), s.k(0), s.k(1), s.k(2), e.config.head_dim, e.waste(), e.config.why);
      lines.push_back(buf);
    }
  }
  return lines;
}

}  // namespace nbhd::cuda::fused
