// SPDX-License-Identifier: Apache-2.0
#include "cuda/gemm/plan.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <mutex>

namespace nbhd::cuda::gemm {
namespace {

// Up to `count` evenly spread starts of tiles of `extent` over [0, length), the last included.
std::vector<int> sample_origins(int length, int extent, int count) {
  std::vector<int> out;
  const int tiles = ceil_div(length, extent);
  const int step = std::max(1, tiles / count);
  for (int t = 0; t < tiles; t += step) out.push_back(t * extent);
  if (out.back() != (tiles - 1) * extent) out.push_back((tiles - 1) * extent);
  return out;
}

// Keys of window `w` through slab offsets `o`.
Range through(Range w, Range o) { return {w.begin + o.begin, std::min(w.end, w.begin + o.end)}; }

}  // namespace

// Costs below come from the work counts of ../shared/design/tiling.md (pairs computed
// per pair needed) until GPU measurements replace them.
std::vector<ShapeChoice> query_candidates(int rank) {
  if (rank == 1) return {{log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 6), "1-D: 64 queries, warps of 16, 64-key tiles"}};
  if (rank == 2)
    return {
        {log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 3), "8x8 queries, 4x4 warps, 8x8 keys: square windows"},
        {log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 4), "8x8 queries, 4x4 warps, 4x16 keys"},
        {log2_shape(0, 2, 4, 0, 1, 3, 0, 2, 4), "4x16 queries, 2x8 warps, 4x16 keys: wide windows"},
        {log2_shape(0, 4, 2, 0, 2, 2, 0, 3, 3), "16x4 queries, 4x4 warps, 8x8 keys: tall windows"},
        {log2_shape(0, 1, 5, 0, 0, 4, 0, 1, 5), "2x32 queries, 1x16 warps, 2x32 keys: very wide windows"},
        {log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 6), "1x64 queries: slabs of window rows recompute nothing along axis 0"},
    };
  return {
      {log2_shape(1, 2, 3, 0, 2, 2, 1, 2, 3), "2x4x8 queries, 1x4x4 warps, 2x4x8 keys"},
      {log2_shape(2, 2, 2, 1, 1, 2, 1, 2, 3), "4x4x4 queries, 2x2x4 warps, 2x4x8 keys: cubic windows"},
      {log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 3), "1x8x8 queries, 1x4x4 warps, 1x8x8 keys: slabs along axis 0"},
      {log2_shape(0, 2, 4, 0, 1, 3, 0, 2, 4), "1x4x16 queries, 1x2x8 warps, 1x4x16 keys: wide windows"},
      {log2_shape(0, 1, 5, 0, 0, 4, 0, 1, 5), "1x2x32 queries: slabs along axis 1"},
      {log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 6), "1x1x64 queries: slabs along axes 0 and 1"},
  };
}

std::vector<ShapeChoice> inverse_candidates(int rank) {
  if (rank == 1) return {{log2_shape(0, 0, 5, 0, 0, 0, 0, 0, 6), "1-D: 64 keys, 32-query tiles"}};
  if (rank == 2)
    return {
        {log2_shape(0, 2, 3, 0, 0, 0, 0, 3, 3), "8x8 keys, 4x8 query tiles"},
        {log2_shape(0, 2, 3, 0, 0, 0, 0, 2, 4), "4x16 keys, 4x8 query tiles"},
        {log2_shape(0, 1, 4, 0, 0, 0, 0, 2, 4), "4x16 keys, 2x16 query tiles: wide windows"},
        {log2_shape(0, 1, 4, 0, 0, 0, 0, 1, 5), "2x32 keys, 2x16 query tiles: very wide windows"},
        {log2_shape(0, 0, 5, 0, 0, 0, 0, 0, 6), "1x64 keys, 1x32 query tiles"},
    };
  return {
      {log2_shape(1, 2, 2, 0, 0, 0, 1, 2, 3), "2x4x8 keys, 2x4x4 query tiles"},
      {log2_shape(1, 2, 2, 0, 0, 0, 2, 2, 2), "4x4x4 keys, 2x4x4 query tiles: cubic windows"},
      {log2_shape(0, 2, 3, 0, 0, 0, 0, 3, 3), "1x8x8 keys, 1x4x8 query tiles"},
      {log2_shape(0, 1, 4, 0, 0, 0, 0, 2, 4), "1x4x16 keys, 1x2x16 query tiles"},
      {log2_shape(0, 0, 5, 0, 0, 0, 0, 0, 6), "1x1x64 keys, 1x1x32 query tiles"},
  };
}

double query_cost(const Problem& p, const TileShape& s, int slab_capacity) {
  const Neighborhood nb = p.neighborhood();
  const SlabPlan slabs = plan_slabs(nb, int(p.additional_tokens), std::max(slab_capacity, 1));
  int lg[kMaxRank];
  std::vector<int> origins[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    lg[a] = nb.axis[a].group_length(0);
    origins[a] = sample_origins(lg[a], s.q(a), p.rank == 3 ? 4 : 6);  // (<= 5^3 tiles: planning stays ~10 ms)
  }
  std::vector<int> slab_ids;
  const int slab_step = std::max(1, slabs.window_slabs / 8);
  for (int i = 0; i < slabs.window_slabs; i += slab_step) slab_ids.push_back(i);
  const double slab_weight = double(slabs.window_slabs) / double(slab_ids.size());

  double charged = 0, needed = 0;
  for (int o0 : origins[0])
    for (int o1 : origins[1])
      for (int o2 : origins[2]) {
        const int origin[kMaxRank] = {o0, o1, o2};
        Range cta_first[kMaxRank], cta_last[kMaxRank];
        for (int a = 0; a < kMaxRank; ++a) {
          cta_first[a] = nb.axis[a].window(origin[a], lg[a]);
          cta_last[a] = nb.axis[a].window(std::min(origin[a] + s.q(a), lg[a]) - 1, lg[a]);
        }
        for (int id : slab_ids) {
          const Slab slab = slab_at(slabs, nb, int(p.additional_tokens), id);
          Range box[kMaxRank];
          bool empty = false;
          for (int a = 0; a < kMaxRank; ++a) {
            box[a] = {cta_first[a].begin + slab.offset[a].begin,
                      std::min(cta_last[a].end, cta_last[a].begin + slab.offset[a].end)};
            empty |= box[a].size() <= 0;
          }
          if (empty) continue;
          for (int w = 0; w < kWarps; ++w) {
            int off[kMaxRank];
            s.warp_offset(w, off);
            double active = 1, visited = 1, warp_needed = 1;
            for (int a = 0; a < kMaxRank; ++a) {
              const int first = origin[a] + off[a], last = std::min(first + s.w(a), lg[a]) - 1;
              if (first > last) {
                active = visited = warp_needed = 0;
                break;
              }
              const Range wbox = {through(nb.axis[a].window(first, lg[a]), slab.offset[a]).begin,
                                  through(nb.axis[a].window(last, lg[a]), slab.offset[a]).end};
              double axis_needed = 0;
              for (int j = first; j <= last; ++j)
                axis_needed += std::max(0, through(nb.axis[a].window(j, lg[a]), slab.offset[a]).size());
              warp_needed *= axis_needed;
              // Keys (rows of key tiles on axes 0 and 1, 8-key chunks on axis 2) the warp
              // computes, and those of the key tiles it visits.
              const int step = a == kMaxRank - 1 ? kChunkKeys : 1;
              double axis_active = 0, axis_visited = 0;
              for (int k = box[a].begin; k < box[a].end; k += s.k(a)) {
                bool hit = false;
                for (int x = k; x < k + s.k(a); x += step) {
                  const bool on = x < wbox.end && x + step > wbox.begin && x < box[a].end;
                  axis_active += on;
                  hit |= on;
                }
                if (hit) axis_visited += s.k(a) / step;
              }
              active *= axis_active;
              visited *= axis_visited;
            }
            // A computed chunk is 16 x 8 pairs; a visited one costs its fragment loads and a
            // predicated mma slot; each key tile its loads and barriers (~24 keys' worth).
            charged += slab_weight * 128.0 * (active + 0.6 * (visited - active)) * (1.0 + 24.0 / kBlockK);
            needed += slab_weight * warp_needed;
          }
        }
      }
  return needed > 0 ? charged / needed : 0;
}

double inverse_cost(const Problem& p, const TileShape& s) {
  const Neighborhood nb = p.neighborhood();
  int lg[kMaxRank];
  std::vector<int> origins[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    lg[a] = nb.axis[a].group_length(0);
    origins[a] = sample_origins(lg[a], s.k(a), 6);
  }
  double gathered = 0, needed = 0;
  for (int o0 : origins[0])
    for (int o1 : origins[1])
      for (int o2 : origins[2]) {
        const int origin[kMaxRank] = {o0, o1, o2};
        double tiles = 1, tile_needed = 1;
        for (int a = 0; a < kMaxRank; ++a) {
          const Range keys = {origin[a], std::min(origin[a] + s.k(a), lg[a])};
          tiles *= ceil_div(nb.axis[a].inverse_window_union(keys, lg[a]).size(), s.q(a));
          double axis_needed = 0;
          for (int k = keys.begin; k < keys.end; ++k) axis_needed += nb.axis[a].inverse_window(k, lg[a]).size();
          tile_needed *= axis_needed;
        }
        gathered += tiles * kBlockQI * kBlockK;
        needed += tile_needed;
      }
  return needed > 0 ? gathered / needed : 0;
}

int pn_capacity(int budget, int dim_pad, int elem, int unit) {
  const int avail = budget - pn_fixed_bytes(dim_pad, elem);
  const int cols = avail / (kBlockQ * 4);  // floats per slab row
  int slots = (cols - 4) / unit * unit - unit + 1;
  while (slots > 0 && pn_smem(dim_pad, slots, unit, elem).bytes > budget) --slots;
  return std::max(slots, 0);
}

int nn_capacity(int budget, int elem, int weight_elem, int unit) {
  const int avail = budget - nn_fixed_bytes(elem);
  const int cols = avail / (kBlockQ * weight_elem);
  int slots = (cols - 16 / weight_elem) / unit * unit - unit + 1;
  while (slots > 0 && nn_smem(slots, unit, elem, weight_elem).bytes > budget) --slots;
  return std::max(slots, 0);
}

int SmemLimits::two_per_sm() const {
  // Each CTA also holds 1 KB the driver reserves (sm_80 and newer).
  return std::min(per_block_optin, per_sm / 2 - 1024);
}

namespace {

Plan compute_plan(const Problem& p, const SmemLimits& limits) {
  const int elem = size_of(p.dtype);
  const int dim_pad = round_up(int(std::min<int64_t>(p.dim, kMaxDim)), 16);
  int capacity = pn_capacity(limits.two_per_sm(), dim_pad, elem, vec_elems(4));
  if (capacity < kMinSlabSlots) capacity = pn_capacity(limits.per_block_optin, dim_pad, elem, vec_elems(4));
  Plan plan;
  bool first = true;
  for (ShapeChoice c : query_candidates(p.rank)) {
    c.cost = query_cost(p, c.shape, capacity);
    if (first || c.cost < plan.query.cost) plan.query = c;
    first = false;
  }
  first = true;
  for (ShapeChoice c : inverse_candidates(p.rank)) {
    c.cost = inverse_cost(p, c.shape);
    if (first || c.cost < plan.inverse.cost) plan.inverse = c;
    first = false;
  }
  return plan;
}

}  // namespace

Plan make_plan(const Problem& p, const SmemLimits& limits) {
  // Planning samples tiles and slabs (a few milliseconds at most); a model calls the
  // same few problems over and over, so keep the answers. The plan depends on the
  // grid geometry, the head dim, the element size, the additional tokens and the
  // device's shared memory only (periodic axes: their windows, hence the work counts,
  // differ near the seam).
  std::array<int64_t, 24> key{p.rank,       p.dim, size_of(p.dtype), p.additional_tokens, limits.per_block_optin,
                              limits.per_sm};
  for (int a = 0; a < p.rank; ++a) {
    key[6 + 6 * a] = p.extent[a];
    key[7 + 6 * a] = p.kernel[a];
    key[8 + 6 * a] = p.dilation[a];
    key[9 + 6 * a] = p.stride[a];
    key[10 + 6 * a] = p.causal[a];
    key[11 + 6 * a] = p.periodic[a];
  }
  static std::mutex mutex;
  static std::map<std::array<int64_t, 24>, Plan> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const Plan plan = compute_plan(p, limits);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() > 4096) cache.clear();
  cache.emplace(key, plan);
  return plan;
}

std::vector<std::string> describe_plan(const Problem& p, const SmemLimits& limits) {
  std::vector<std::string> lines;
  const Plan plan = make_plan(p, limits);
  const int elem = size_of(p.dtype);
  const int dim_pad = round_up(int(std::min<int64_t>(p.dim, kMaxDim)), 16);
  const int capacity = pn_capacity(limits.two_per_sm(), dim_pad, elem, vec_elems(4));
  const SlabPlan slabs = plan_slabs(p.neighborhood(), int(p.additional_tokens), std::max(capacity, 1));
  char buf[256];
  for (ShapeChoice c : query_candidates(p.rank)) {
    c.cost = query_cost(p, c.shape, capacity);
    const TileShape& s = c.shape;
    const bool chosen = std::equal(s.q_log2, s.q_log2 + kMaxRank, plan.query.shape.q_log2) &&
                        std::equal(s.k_log2, s.k_log2 + kMaxRank, plan.query.shape.k_log2) &&
                        std::equal(s.w_log2, s.w_log2 + kMaxRank, plan.query.shape.w_log2);
    std::snprintf(buf, sizeof buf, "gemm PN/NN %s q %dx%dx%d warp %dx%dx%d kv %dx%dx%d: cost %.3g  [%s]",
                  chosen ? "CHOSEN  " : "rejected", s.q(0), s.q(1), s.q(2), s.w(0), s.w(1), s.w(2), s.k(0), s.k(1),
                  s.k(2), c.cost, c.why);
    lines.push_back(buf);
  }
  std::snprintf(buf, sizeof buf, "gemm PN slabs: %d of up to %d slots (split axis %d, %d offsets per slab)%s",
                slabs.count(), slabs.slots, slabs.split_axis, slabs.split_extent,
                slabs.whole_row() ? ", whole rows: softmax fused into PN" : "");
  lines.push_back(buf);
  for (ShapeChoice c : inverse_candidates(p.rank)) {
    c.cost = inverse_cost(p, c.shape);
    const TileShape& s = c.shape;
    const bool chosen = std::equal(s.q_log2, s.q_log2 + kMaxRank, plan.inverse.shape.q_log2) &&
                        std::equal(s.k_log2, s.k_log2 + kMaxRank, plan.inverse.shape.k_log2);
    std::snprintf(buf, sizeof buf, "gemm IN %s keys %dx%dx%d queries %dx%dx%d: cost %.3g  [%s]",
                  chosen ? "CHOSEN  " : "rejected", s.k(0), s.k(1), s.k(2), s.q(0), s.q(1), s.q(2), c.cost, c.why);
    lines.push_back(buf);
  }
  return lines;
}

}  // namespace nbhd::cuda::gemm
