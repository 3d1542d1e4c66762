// SPDX-License-Identifier: Apache-2.0
#include "cuda/fused/backward_plan.hpp"

#include "cuda/fused/halo_layout.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace nbhd::cuda::fused {

std::vector<TileConfig> backward_candidates(DType dtype, int rank, int head_dim, bool hopper) {
  std::vector<TileConfig> out;
  if (head_dim > 128) return out;
  for (const TileConfig& c : candidate_configs(dtype, rank, head_dim))
    if (c.warps == kBackwardWarps && c.block_kv == backward_cols(dtype, head_dim) && c.m_tiles == 1) out.push_back(c);
  // The wgmma key pass: two consumer warpgroups of 64 keys (the forward's
  // warp-specialized query tiles, 8 warps) and its 64-key tiles as query tiles.
  if (hopper && dtype != DType::kFloat32 && (head_dim == 64 || head_dim == 128))
    for (const TileConfig& c : candidate_configs(dtype, rank, head_dim, /*hopper=*/true))
      if (c.wgmma && c.warps == 8 && c.block_kv == backward_cols(dtype, head_dim)) out.push_back(c);
  return out;
}

std::string wgmma_key_pass_refusal(const Problem& p, bool d_rpb, bool deterministic) {
  if ((p.has_rpb || d_rpb) && head_dim_bucket(p.dim, p.value_dim()) > 64)
    return "rpb at head dim " + std::to_string(head_dim_bucket(p.dim, p.value_dim())) +
           ": the wgmma key pass has its rpb paths at head dim 64 only (at 128 ptxas spilled 508 instead of 264 bytes)";
  // Measured on an H100 (2026-12-08, head dim 64, backward alone): 1-D 32k w2048 4.67
  // ms against 3.78 on the mma.sync key pass, while 2-D 128² k31 gained (2.14 against
  // 2.49). docs/performance.md, "bv3".
  if ((p.has_rpb || d_rpb) && p.rank == 1)
    return "rpb on a 1-D problem: the wgmma key pass's d rpb bins measured 0.81x of the mma.sync key pass (H100, "
           "32k tokens, window 2048)";
  if (deterministic && d_rpb)
    return "deterministic d rpb: the wgmma key pass bins it by shared-memory atomics, in no fixed order (the mma.sync "
           "key pass sums it in a fixed order)";
  return "";
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
        Range group_queries[2][kMaxRank] = {};  // wgmma: per warpgroup, the bounding box of its unions
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
          if (!c.wgmma) {
            // Over the query tiles of the CTA's query box: chunks the warp computes,
            // and chunks of the tiles it does not skip (any chunk active).
            add_warp_chunks(s, qbox, uni, &e);
            continue;
          }
          for (int a = 0; a < kMaxRank; ++a) {
            Range& gq = group_queries[w / 4][a];
            gq = gq.size() > 0 ? Range{std::min(gq.begin, uni[a].begin), std::max(gq.end, uni[a].end)} : uni[a];
          }
          // The query box's tiles this warp masks element by element: those not
          // inside the intersection of its keys' inverse windows (or past the box).
          double tiles = 1, unmasked = 1;
          for (int a = 0; a < kMaxRank; ++a) {
            const int first = origin[a] + off[a], last = std::min(first + s.w(a), lg[a]) - 1;
            const Range inter{nb.axis[a].inverse_window(last, lg[a]).begin, nb.axis[a].inverse_window(first, lg[a]).end};
            int axis_tiles = 0, axis_inside = 0;
            for (int q = qbox[a].begin; q < qbox[a].end; q += s.k(a)) {
              ++axis_tiles;
              axis_inside += q >= inter.begin && q + s.k(a) <= inter.end && q + s.k(a) <= qbox[a].end;
            }
            tiles *= axis_tiles;
            unmasked *= axis_inside;
          }
          e.warp_tiles += tiles;
          e.masked_warp_tiles += tiles - unmasked;
        }
        // wgmma: a warpgroup computes, for its 64 keys, every query tile that meets
        // the bounding box of its warps' inverse-window unions, whole.
        for (int g = 0; c.wgmma && g < c.warps / 4; ++g) {
          double tiles = 1;
          for (int a = 0; a < kMaxRank; ++a) {
            const Range& r = group_queries[g][a];
            int axis_tiles = 0;
            for (int q = qbox[a].begin; q < qbox[a].end; q += s.k(a)) axis_tiles += q < r.end && q + s.k(a) > r.begin;
            tiles *= axis_tiles;
          }
          e.computed_pairs += tiles * s.keys() * 64;
          e.visited_pairs += tiles * s.keys() * 64;
        }
      }
  // The forward's cost model (plan.cpp): charged_pairs, a per-tile overhead of 24
  // queries' worth. wgmma: a computed pair costs kWgmmaKeyPassRate of a charged
  // mma.sync one and a tile a warp masks 1.3x an unmasked one (the forward's mask
  // term). Rates from the first sweep (H200, commit 950734a; bench/results/
  // hopper-backward-h200-2026-12-06): wgmma / mma.sync backward times were 0.45-0.48
  // on the unmasked and 1-D head-dim-128 problems (this model: 0.45-0.47), 0.45-0.50
  // on 2-D and 3-D (model 0.51-0.64: the mask term overcharges it there, without
  // changing a choice), 0.64 on 1-D w2048 at head dim 64 and 1.03 on 56² k7 at 64,
  // where mma.sync is the faster: 0.61 at head dim 64 picks it there.
  const double kWgmmaKeyPassRate = c.head_dim >= 128 ? 0.45 : 0.61;
  const double charged =
      c.wgmma ? kWgmmaKeyPassRate * e.computed_pairs * (1.0 + 0.3 * e.masked_fraction()) : charged_pairs(e);
  e.cost = (e.needed_pairs > 0 ? charged / e.needed_pairs : 0) * (1.0 + 24.0 / c.block_kv);
  return e;
}

namespace {

// The candidates a pass may take, with their estimates, least cost first: the key
// pass every candidate (the wgmma ones where they run the problem), the dq pass the
// mma.sync ones. (The deterministic mode's exception is the launch's: plans are
// cached per problem.)
std::vector<PlanEstimate> ranked(const Problem& p, bool hopper, bool key_pass) {
  std::vector<PlanEstimate> out;
  const bool wgmma_ok = wgmma_key_pass_refusal(p, /*d_rpb=*/p.has_rpb, /*deterministic=*/false).empty();
  for (const TileConfig& c : backward_candidates(p.dtype, p.rank, head_dim_bucket(p.dim, p.value_dim()), hopper)) {
    if (c.wgmma && (!key_pass || !wgmma_ok)) continue;
    out.push_back(key_pass ? estimate_key_pass(p, c) : estimate(p, c));
  }
  std::stable_sort(out.begin(), out.end(), [](const PlanEstimate& a, const PlanEstimate& b) { return a.cost < b.cost; });
  return out;
}

}  // namespace

bool halo_dq_asked() {
  const char* forced = std::getenv("NBHD_FUSED_BACKWARD_DQ");
  return forced && std::string(forced) == "halo";
}

bool halo_dq_entry(const Problem& p, TileConfig* entry) {
  for (const TileConfig& c : candidate_configs(p.dtype, p.rank, head_dim_bucket(p.dim, p.value_dim())))
    if (c.halo && c.warps == kBackwardWarps && halo_refusal(p, c, /*query_tensors=*/2).empty()) {
      *entry = c;
      return true;
    }
  return false;
}

bool halo_dq_chosen(const Problem& p, TileConfig* entry) {
  const bool asked = halo_dq_asked() || (!std::getenv("NBHD_FUSED_BACKWARD_DQ") && halo_by_default(p));
  return asked && halo_dq_entry(p, entry);
}

bool halo_key_chosen(const Problem& p, bool d_rpb, bool deterministic, TileConfig* entry) {
  const bool asked = halo_key_asked() || (!std::getenv("NBHD_FUSED_BACKWARD_KEY") && halo_by_default(p));
  return asked && halo_key_entry(p, d_rpb, deterministic, entry);
}

bool halo_key_asked() {
  const char* forced = std::getenv("NBHD_FUSED_BACKWARD_KEY");
  return forced && std::string(forced) == "halo";
}

int halo_key_rows_bound(const Problem& p, const TileShape& s) {
  const Neighborhood nb = p.neighborhood();
  int64_t rows = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const Range box = p.padded_query_range(a);
    int longest = 0;
    for (int g = 0; g < ax.dilation; ++g) {
      const int lg = ax.group_length(g);
      const Range part = group_indices(box.begin, box.end, g, ax.dilation);
      for (int origin = 0; origin < lg; origin += s.q(a)) {
        Range q = ax.inverse_window_union({origin, std::min(origin + s.q(a), lg)}, lg);
        if (!ax.periodic) q = {std::max(q.begin, part.begin), std::min(q.end, part.end)};
        longest = std::max(longest, q.size());
      }
    }
    rows *= longest;
  }
  return int(std::min<int64_t>(rows, 1 << 24));
}

bool halo_key_entry(const Problem& p, bool d_rpb, bool deterministic, TileConfig* entry) {
  if ((d_rpb && deterministic) || p.additional_tokens > 0) return false;
  int64_t bins = 1;
  for (int a = 0; a < p.rank; ++a) bins *= 2 * p.kernel[a] - 1;
  if ((p.has_rpb || d_rpb) && bins > kHaloMaxBiasBins) return false;
  const int bias_floats = p.has_rpb || d_rpb ? int(bins) : 0;
  for (const TileConfig& c : candidate_configs(p.dtype, p.rank, head_dim_bucket(p.dim, p.value_dim())))
    if (const int rows = halo_key_rows_bound(p, c.shape);
        c.halo && c.warps == kBackwardWarps && rows <= kHaloMaxSharedBytes / 64 &&
        halo_key_pass_shared_bytes(c.warps * 16, c.head_dim, rows, bias_floats) <= kHaloMaxSharedBytes) {
      *entry = c;
      return true;
    }
  return false;
}

bool prefer_dq_pass(const Problem& p) {
  if (const char* forced = std::getenv("NBHD_FUSED_BACKWARD_DQ")) {
    if (std::string(forced) == "pass" || std::string(forced) == "halo") return true;
    if (std::string(forced) == "atomics") return false;
  }
  return p.window_size() <= kDqPassMaxWindow;
}

BackwardPlan plan_backward(const Problem& p, bool hopper) {
  return {ranked(p, hopper, true).front().config, ranked(p, hopper, false).front().config, prefer_dq_pass(p)};
}

std::vector<std::string> describe_backward_plan(const Problem& p, bool hopper) {
  std::vector<std::string> lines;
  const int bucket = head_dim_bucket(p.dim, p.value_dim());
  if (backward_candidates(p.dtype, p.rank, bucket).empty()) {
    lines.push_back("fused backward: runs max(dim, dim_v) <= 128, got " + std::to_string(std::max(p.dim, p.value_dim())));
    return lines;
  }
  for (int pass = 0; pass < 2; ++pass) {
    const auto list = ranked(p, hopper, pass == 0);
    for (size_t i = 0; i < list.size(); ++i) {
      const PlanEstimate& e = list[i];
      const TileShape& s = e.config.shape;
      char buf[320];
      std::snprintf(buf, sizeof buf,
                    "fused backward %s %s %s rows %dx%dx%d warp %dx%dx%d cols %dx%dx%d (d %d): %.2fx pairs, cost %.3g  [%s]",
                    pass == 0 ? "key pass" : "dq pass ", i == 0 ? "CHOSEN  " : "rejected",
                    e.config.wgmma ? "wgmma   " : "mma.sync", s.q(0), s.q(1), s.q(2), s.w(0), s.w(1), s.w(2), s.k(0),
                    s.k(1), s.k(2), e.config.head_dim, e.waste(), e.cost, e.config.why);
      lines.push_back(buf);
    }
  }
  const std::string refusal = wgmma_key_pass_refusal(p, /*d_rpb=*/p.has_rpb, /*deterministic=*/false);
  if (hopper && !refusal.empty() && backward_candidates(p.dtype, p.rank, bucket, true).size() >
                                        backward_candidates(p.dtype, p.rank, bucket).size())
    lines.push_back("fused backward: no wgmma key pass: " + refusal);
  const TileConfig key_pass = ranked(p, hopper, true).front().config;
  if (key_pass.wgmma && p.has_rpb)
    lines.push_back("fused backward: with Options::deterministic, the mma.sync key pass instead (" +
                    wgmma_key_pass_refusal(p, /*d_rpb=*/true, /*deterministic=*/true) + ")");
  if (key_pass.wgmma) {
    TmaView views[2];
    const std::string why = key_pass_tma_views(p, key_pass, contiguous_layout(p, p.heads, p.dim),
                                               contiguous_layout(p, p.heads, p.value_dim()), views);
    lines.push_back(why.empty() ? "fused backward key pass loads: Q and dO by TMA (contiguous tensors)"
                                : "fused backward key pass loads: cp.async (" + why + ")");
  }
  TileConfig halo;
  lines.push_back(halo_dq_entry(p, &halo)
                      ? std::string("fused backward dq pass halo: ") + halo.why +
                            (halo_by_default(p) ? " (chosen: measured 1.1-1.25x the tiled dq pass on 1-D/2-D small windows)"
                                                : " (not the default here; NBHD_FUSED_BACKWARD_DQ=halo runs it)")
                      : "fused backward dq pass halo: none runs this problem (16-bit, head dims <= 64, no additional "
                        "tokens, Q, dO and the key box within " + std::to_string(kHaloMaxSharedBytes) +
                            " bytes of shared memory)");
  lines.push_back(halo_key_entry(p, /*d_rpb=*/p.has_rpb, /*deterministic=*/false, &halo)
                      ? std::string("fused backward key pass halo: ") + halo.why +
                            (halo_by_default(p) ? " (chosen, but not for deterministic d rpb: measured 1.3-1.6x the tiled "
                                                  "key pass on 1-D/2-D small windows)"
                                                : " (not the default here; NBHD_FUSED_BACKWARD_KEY=halo runs it)")
                      : "fused backward key pass halo: none runs this problem (16-bit, head dims <= 64, no additional "
                        "tokens, at most " + std::to_string(kHaloMaxBiasBins) + " bias bins, K, V, Q, dO and the query "
                        "box within " + std::to_string(kHaloMaxSharedBytes) + " bytes of shared memory)");
  return lines;
}

}  // namespace nbhd::cuda::fused
