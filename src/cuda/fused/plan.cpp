// SPDX-License-Identifier: Apache-2.0
#include "cuda/fused/plan.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>

#include "cuda/fused/halo_layout.hpp"

namespace nbhd::cuda::fused {
namespace {

// The table. Extents are log2 (3 = 8). Query tiles of 64 (4 warps) or 128
// (8 warps); warp boxes of 16; key tiles of 64 with an innermost run >= 8.
// Reasons come from ../shared/design/tiling.md (pairs computed per pair needed,
// per-warp 8-key-chunk skipping) until GPU measurements replace them.
const std::vector<TileConfig>& table() {
  static const std::vector<TileConfig> t = {
      // rank 1 (leading axes are length 1)
      {1, 0, 4, 64, 1, log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 6), "1-D 64 queries, 64-key tiles"},
      {1, 0, 4, 128, 1, log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 7), "1-D 64 queries, 128-key tiles: half the per-tile overhead"},
      {1, 0, 8, 64, 1, log2_shape(0, 0, 7, 0, 0, 4, 0, 0, 6), "1-D 128 queries: 3.74 vs 3.82 ms (4 warps) at w2048, H200"},
      // rank 2
      {2, 0, 4, 64, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 4), "2-D 8x8 / warp 4x4 / keys 4x16: 1.31x at k31 (tiling.md)"},
      {2, 0, 4, 64, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 3), "2-D 8x8 / warp 4x4 / keys 8x8: square windows, short rows"},
      {2, 0, 4, 64, 1, log2_shape(0, 2, 4, 0, 1, 3, 0, 2, 4), "2-D 4x16 / warp 2x8 / keys 4x16: wide windows"},
      {2, 0, 4, 128, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 4), "2-D 8x8 / warp 4x4 / keys 8x16"},
      {2, 0, 4, 128, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 5), "2-D 8x8 / warp 4x4 / keys 4x32"},
      {2, 0, 4, 128, 1, log2_shape(0, 2, 4, 0, 1, 3, 0, 2, 5), "2-D 4x16 / warp 2x8 / keys 4x32: wide windows"},
      {2, 0, 4, 128, 1, log2_shape(0, 1, 5, 0, 0, 4, 0, 1, 6), "2-D 2x32 / warp 1x16 / keys 2x64: very wide windows"},
      {2, 0, 8, 64, 1, log2_shape(0, 3, 4, 0, 2, 2, 0, 2, 4), "2-D 8x16 / warp 4x4 / keys 4x16: K/V reuse, 1.10x at k80"},
      {2, 0, 8, 64, 1, log2_shape(0, 4, 3, 0, 2, 2, 0, 3, 3), "2-D 16x8 / warp 4x4 / keys 8x8: 2.36 ms at k31, best, H200"},
      // rank 3
      {3, 0, 4, 64, 1, log2_shape(1, 2, 3, 0, 2, 2, 0, 2, 4), "3-D 2x4x8 / warp 1x4x4 / keys 1x4x16"},
      {3, 0, 4, 64, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 4), "3-D 1x8x8 / warp 1x4x4 / keys 1x4x16"},
      {3, 0, 4, 64, 1, log2_shape(2, 2, 2, 1, 1, 2, 1, 2, 3), "3-D 4x4x4 / warp 2x2x4 / keys 2x4x8: 1.30x Hunyuan (tiling.md)"},
      {3, 0, 4, 128, 1, log2_shape(1, 2, 3, 0, 2, 2, 1, 2, 4), "3-D 2x4x8 / warp 1x4x4 / keys 2x4x16"},
      {3, 0, 4, 128, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 4), "3-D 1x8x8 / warp 1x4x4 / keys 1x8x16"},
      {3, 0, 4, 128, 1, log2_shape(2, 2, 2, 1, 1, 2, 1, 3, 3), "3-D 4x4x4 / warp 2x2x4 / keys 2x8x8"},
      {3, 0, 4, 128, 1, log2_shape(2, 2, 2, 1, 1, 2, 2, 2, 3), "3-D 4x4x4 / warp 2x2x4 / keys 4x4x8"},
      {3, 0, 8, 64, 1, log2_shape(1, 3, 3, 0, 2, 2, 0, 2, 4), "3-D 2x8x8 / warp 1x4x4 / keys 1x4x16"},
      {3, 0, 8, 64, 1, log2_shape(2, 2, 3, 1, 1, 2, 1, 2, 3), "3-D 4x4x8 / warp 2x2x4 / keys 2x4x8: 37 ms at 16x48x80, best, H200"},
      // 32-key tiles: float32 at head dim 128 only, where 64-key tiles would need
      // 168 KB of shared memory (Q 32 KB, two stages of K and V 128 KB), over sm_80's
      // 163 KB. Not yet measured: the shapes follow the 64-key entries.
      {1, 0, 4, 32, 1, log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 5), "1-D 64 queries, 32-key tiles (float32, head dim 128)"},
      {2, 0, 4, 32, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 3), "2-D 8x8 / warp 4x4 / keys 4x8 (float32, head dim 128)"},
      {2, 0, 4, 32, 1, log2_shape(0, 2, 4, 0, 1, 3, 0, 1, 4), "2-D 4x16 / warp 2x8 / keys 2x16: wide windows (float32, head dim 128)"},
      {3, 0, 4, 32, 1, log2_shape(1, 2, 3, 0, 2, 2, 0, 2, 3), "3-D 2x4x8 / warp 1x4x4 / keys 1x4x8 (float32, head dim 128)"},
      {3, 0, 4, 32, 1, log2_shape(2, 2, 2, 1, 1, 2, 1, 1, 3), "3-D 4x4x4 / warp 2x2x4 / keys 2x2x8 (float32, head dim 128)"},
      // wgmma (sm_90a): 64 queries per warpgroup; a visited key tile is computed
      // whole, so key tiles hug the window's shape. Times: H200, commit 2145f1f.
      {1, 0, 4, 64, 1, log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 6), "wgmma 1-D 64 queries: 2.43 ms at w2048 (mma.sync 3.49)", true},
      {2, 0, 4, 64, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 3, 3), "wgmma 2-D 8x8 / keys 8x8: 1.57 ms at k31, 6.21 at k80 (x6 heads), best", true},
      {2, 0, 4, 64, 1, log2_shape(0, 3, 3, 0, 2, 2, 0, 2, 4), "wgmma 2-D 8x8 / keys 4x16: 1.87 ms at k31", true},
      {2, 0, 4, 64, 1, log2_shape(0, 2, 4, 0, 1, 3, 0, 2, 4), "wgmma 2-D 4x16 / keys 4x16: wide windows, 1.73 ms at k31", true},
      {3, 0, 4, 64, 1, log2_shape(1, 2, 3, 0, 2, 2, 1, 2, 3), "wgmma 3-D 2x4x8 / keys 2x4x8: 6.28 ms at 16x48x80 (x8 heads), 16.0 at Hunyuan (x4), best", true},
      {3, 0, 4, 64, 1, log2_shape(1, 2, 3, 0, 2, 2, 0, 2, 4), "wgmma 3-D 2x4x8 / keys 1x4x16: 6.70 ms at 16x48x80", true},
      {3, 0, 4, 64, 1, log2_shape(2, 2, 2, 1, 1, 2, 1, 2, 3), "wgmma 3-D 4x4x4 / keys 2x4x8: 6.85 ms at 16x48x80", true},
      // Not kept: two warpgroups sharing K/V among 128 queries (half the L2 reads
      // per pair) ran 2-12% slower per computed pair (1-D 2.49 vs 2.43 ms); 128-key
      // tiles at head dim 64 spilled and were never the fastest.
      // wgmma, warp-specialized: 128 queries (two consumer warpgroups of 64, each a
      // half of the tile along its outermost axis) and a producer warpgroup. Times:
      // H200, commit caa4075, same heads as above.
      {1, 0, 8, 64, 1, log2_shape(0, 0, 7, 0, 0, 4, 0, 0, 6), "wgmma-ws 1-D 128 queries: 1.93 ms at w2048 (one warpgroup 2.42)", true},
      {2, 0, 8, 64, 1, log2_shape(0, 4, 3, 0, 2, 2, 0, 3, 3), "wgmma-ws 2-D 16x8 / keys 8x8: 1.35 ms at k31, 4.81 at k80, best", true},
      {2, 0, 8, 64, 1, log2_shape(0, 3, 4, 0, 2, 2, 0, 3, 3), "wgmma-ws 2-D 8x16 / keys 8x8: 1.48 ms at k31", true},
      {2, 0, 8, 64, 1, log2_shape(0, 3, 4, 0, 2, 2, 0, 2, 4), "wgmma-ws 2-D 8x16 / keys 4x16: wide windows, 1.44 ms at k31", true},
      {3, 0, 8, 64, 1, log2_shape(2, 2, 3, 1, 1, 2, 1, 2, 3), "wgmma-ws 3-D 4x4x8 / keys 2x4x8: 4.98 ms at 16x48x80, 12.6 at Hunyuan, best", true},
      {3, 0, 8, 64, 1, log2_shape(1, 3, 3, 0, 2, 2, 1, 2, 3), "wgmma-ws 3-D 2x8x8 / keys 2x4x8: 5.35 ms at 16x48x80", true},
      {3, 0, 8, 64, 1, log2_shape(1, 3, 3, 0, 2, 2, 0, 2, 4), "wgmma-ws 3-D 2x8x8 / keys 1x4x16: 5.69 ms at 16x48x80", true},
      // wgmma, warp-specialized, 128-key tiles (two or three stages), consumers taking
      // turns (ping-pong): half the per-tile work (mbarrier waits, skip and mask
      // decisions, row-max shuffles, O's rescale) per key, wgmmas of N = 128 for S.
      // H100, 4 heads, commit 5385073, against the 64-key entry: 1-D w2048 stride 2048
      // 0.440 vs 0.466 ms, FLUX k80 stride 16 2.307 vs 2.519, 1-D w2048 0.498 vs 0.500;
      // slower where tiles are masked: 2-D k31 0.439 vs 0.370, 3-D k8x16x24 2.92 vs 2.63.
      {1, 0, 8, 128, 1, log2_shape(0, 0, 7, 0, 0, 4, 0, 0, 7), "wgmma-ws 1-D 128 queries, 128-key tiles: 0.498 ms at w2048, 0.440 at stride 2048", true},
      {2, 0, 8, 128, 1, log2_shape(0, 4, 3, 0, 2, 2, 0, 3, 4), "wgmma-ws 2-D 16x8 / keys 8x16: 2.31 ms at FLUX k80 stride 16 (x4 heads), best", true},
      {2, 0, 8, 128, 1, log2_shape(0, 3, 4, 0, 2, 2, 0, 2, 5), "wgmma-ws 2-D 8x16 / keys 4x32: wide windows", true},
      {3, 0, 8, 128, 1, log2_shape(2, 2, 3, 1, 1, 2, 1, 2, 4), "wgmma-ws 3-D 4x4x8 / keys 2x4x16", true},
      {3, 0, 8, 128, 1, log2_shape(2, 2, 3, 1, 1, 2, 1, 3, 3), "wgmma-ws 3-D 4x4x8 / keys 2x8x8", true},
      // The halo kernel (mma.sync, 16-bit, head dims 32 and 64): the query tile's key
      // box loaded once, each warp computing against its own windows' union in 8-key
      // blocks along the innermost axis. Warp boxes 2x8 (1x2x8): NAT's 7x7 windows
      // give 8 rows of 14 keys, 16 blocks, 128 keys computed for 49 attended (a 4x4
      // box: 10 rows of 10, 20 blocks). Not yet timed: chosen only when forced.
      {1, 0, 8, 0, 1, log2_shape(0, 0, 7, 0, 0, 4, 0, 0, 0), "halo 1-D 128 queries / warp 16", false, true},
      {1, 0, 4, 0, 1, log2_shape(0, 0, 6, 0, 0, 4, 0, 0, 0), "halo 1-D 64 queries / warp 16", false, true},
      {2, 0, 8, 0, 1, log2_shape(0, 3, 4, 0, 1, 3, 0, 0, 0), "halo 2-D 8x16 / warp 2x8: 14x22 keys at k7, 49 KB at head dim 32", false, true},
      {2, 0, 4, 0, 1, log2_shape(0, 3, 3, 0, 1, 3, 0, 0, 0), "halo 2-D 8x8 / warp 2x8: 14x14 keys at k7, 30 KB at head dim 32, 60 KB at 64", false, true},
      {3, 0, 8, 0, 1, log2_shape(2, 2, 3, 0, 1, 3, 0, 0, 0), "halo 3-D 4x4x8 / warp 1x2x8", false, true},
      {3, 0, 4, 0, 1, log2_shape(1, 2, 3, 0, 1, 3, 0, 0, 0), "halo 3-D 2x4x8 / warp 1x2x8", false, true},
  };
  return t;
}

}  // namespace

int head_dim_bucket(int64_t dim, int64_t dim_v) {
  const int64_t d = std::max(dim, dim_v);
  for (int bucket : {32, 64, 128, 256})
    if (d <= bucket) return bucket;
  return 0;
}

bool wgmma_kernels_built() {
#if defined(NBHD_FUSED_WGMMA) && NBHD_FUSED_WGMMA
  return true;
#else
  return false;
#endif
}

bool kernel_compiled(DType dtype, int head_dim, int warps, int block_kv, int m_tiles, bool wgmma, bool halo) {
  // The kernel manifest, forward_kernels.txt (it says why each shape is there).
  struct Shape {
    bool float32;
    int head_dim, warps, block_kv, m_tiles;
    bool wgmma, halo;
  };
  static constexpr Shape kManifest[] = {
#define NBHD_FUSED_SHAPE(F32, D, W, KV, M, G, H) {F32, D, W, KV, M, G, H},
#include "fused_forward_manifest.inc"
#undef NBHD_FUSED_SHAPE
  };
  if (wgmma && !wgmma_kernels_built()) return false;
  for (const Shape& s : kManifest)
    if (s.float32 == (dtype == DType::kFloat32) && s.head_dim == head_dim && s.warps == warps &&
        s.block_kv == block_kv && s.m_tiles == m_tiles && s.wgmma == wgmma && s.halo == halo)
      return true;
  return false;
}

std::vector<TileConfig> candidate_configs(DType dtype, int rank, int head_dim, bool hopper) {
  std::vector<TileConfig> out;
  for (TileConfig c : table()) {
    if (c.rank != rank || (c.wgmma && !hopper) ||
        !kernel_compiled(dtype, head_dim, c.warps, c.block_kv, c.m_tiles, c.wgmma, c.halo))
      continue;
    c.head_dim = head_dim;
    out.push_back(c);
  }
  return out;
}

namespace {

// Per axis, the group the estimate samples and its query indices: group 0, all of
// it, or with a query sub-box the group of the box's first token and its part of
// the box (tiles start at the box's corner). A box holds the grid's middle queries,
// whose windows slide, so its tiles are masked more than the grid's clamped edges.
struct SampledQueries {
  int group[kMaxRank];
  Range indices[kMaxRank];
};

SampledQueries whole_group_0(const Neighborhood& nb) {
  SampledQueries q;
  for (int a = 0; a < kMaxRank; ++a) {
    q.group[a] = 0;
    q.indices[a] = {0, nb.axis[a].group_length(0)};
  }
  return q;
}

SampledQueries sampled_queries(const Problem& p, const Neighborhood& nb) {
  SampledQueries q = whole_group_0(nb);
  if (!p.has_query_box()) return q;
  const int first = kMaxRank - p.rank;  // the problem's axis u is the neighborhood's first + u
  for (int a = first; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int u = a - first;
    const int begin = int(p.query_begin[u]), end = p.query_end[u] ? int(p.query_end[u]) : int(p.extent[u]);
    q.group[a] = begin % ax.dilation;
    q.indices[a] = group_indices(begin, end, q.group[a], ax.dilation);
  }
  return q;
}

void sample_tile_origins(const SampledQueries& q, const TileShape& s, std::vector<int> (&origins)[kMaxRank]) {
  for (int a = 0; a < kMaxRank; ++a) {
    origins[a].clear();
    const int tiles = ceil_div(q.indices[a].size(), s.q(a));
    const int step = std::max(1, tiles / 8);
    for (int t = 0; t < tiles; t += step) origins[a].push_back(q.indices[a].begin + t * s.q(a));
    if (origins[a].back() != q.indices[a].begin + (tiles - 1) * s.q(a))
      origins[a].push_back(q.indices[a].begin + (tiles - 1) * s.q(a));
  }
}

}  // namespace

void sample_tile_origins(const Neighborhood& nb, const TileShape& s, std::vector<int> (&origins)[kMaxRank]) {
  sample_tile_origins(whole_group_0(nb), s, origins);
}

void add_warp_chunks(const TileShape& s, const Range* box, const Range* uni, PlanEstimate* e) {
  double active = 1, visited = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    double axis_active = 0, axis_visited = 0;
    const int step = a == kMaxRank - 1 ? 8 : 1;  // chunk extent along the axis
    for (int k = box[a].begin; k < box[a].end; k += s.k(a)) {
      const bool tile_hit = k < uni[a].end && k + s.k(a) > uni[a].begin;
      for (int x = 0; x < s.k(a); x += step) {
        const int lo = k + x, hi = lo + step;
        if (lo < uni[a].end && hi > uni[a].begin && lo < box[a].end) ++axis_active;
      }
      if (tile_hit) axis_visited += s.k(a) / step;
    }
    active *= axis_active;
    visited *= axis_visited;
  }
  // The tensor cores compute 16 rows x 8 keys per active chunk.
  e->computed_pairs += active * 8 * 16;
  e->visited_pairs += visited * 8 * 16;
}

double charged_pairs(const PlanEstimate& e) { return e.computed_pairs + 0.6 * (e.visited_pairs - e.computed_pairs); }

PlanEstimate estimate(const Problem& p, const TileConfig& c) {
  PlanEstimate e;
  e.config = c;
  const Neighborhood nb = p.neighborhood();
  const TileShape& s = c.shape;
  const SampledQueries sampled = sampled_queries(p, nb);
  std::vector<int> origins[kMaxRank];  // of query tiles
  sample_tile_origins(sampled, s, origins);
  const int boxes = c.warps * c.m_tiles;  // 16-query boxes per CTA
  for (int o0 : origins[0])
    for (int o1 : origins[1])
      for (int o2 : origins[2]) {
        const int origin[kMaxRank] = {o0, o1, o2};
        int lg[kMaxRank], end[kMaxRank];  // group length, end of the sampled indices
        Range kbox[kMaxRank];
        for (int a = 0; a < kMaxRank; ++a) {
          lg[a] = nb.axis[a].group_length(sampled.group[a]);
          end[a] = sampled.indices[a].end;
          const int last = std::min(origin[a] + s.q(a), end[a]) - 1;
          kbox[a] = {nb.axis[a].window(origin[a], lg[a]).begin, nb.axis[a].window(last, lg[a]).end};
        }
        Range group_keys[2][kMaxRank] = {};  // wgmma: per warpgroup, the bounding box of its boxes' unions
        for (int w = 0; w < boxes; ++w) {
          int off[kMaxRank];
          s.warp_offset(w, off);
          Range uni[kMaxRank];
          double needed = 1;
          bool idle = false;
          for (int a = 0; a < kMaxRank; ++a) {
            const int first = origin[a] + off[a], last = std::min(first + s.w(a), end[a]) - 1;
            if (first > last) {
              idle = true;
              break;
            }
            uni[a] = {nb.axis[a].window(first, lg[a]).begin, nb.axis[a].window(last, lg[a]).end};
            double axis_needed = 0;
            for (int j = first; j <= last; ++j) axis_needed += nb.axis[a].window(j, lg[a]).size();
            needed *= axis_needed;
          }
          if (idle) continue;
          for (int a = 0; a < kMaxRank; ++a) {
            Range& g = group_keys[w / 4][a];
            g = g.size() > 0 ? Range{std::min(g.begin, uni[a].begin), std::max(g.end, uni[a].end)} : uni[a];
          }
          e.needed_pairs += needed;
          if (c.halo) {
            // 16 rows x the warp's key box, its innermost extent padded to 8-key blocks.
            const double keys = double(uni[0].size()) * uni[1].size() * ((uni[2].size() + 7) / 8 * 8);
            e.computed_pairs += 16 * keys;
            e.visited_pairs += 16 * keys;
            continue;
          }
          // Over the key tiles of the CTA's key box that the warp visits (any key of
          // its union): chunks it computes (active) and chunks it predicates off.
          if (!c.wgmma) add_warp_chunks(s, kbox, uni, &e);
          // The key box's tiles this warp must mask element by element: those not
          // inside the intersection of its queries' windows (or past the key box).
          double tiles = 1, unmasked = 1;
          for (int a = 0; a < kMaxRank; ++a) {
            const int first = origin[a] + off[a], last = std::min(first + s.w(a), end[a]) - 1;
            const Range inter{nb.axis[a].window(last, lg[a]).begin, nb.axis[a].window(first, lg[a]).end};
            int axis_tiles = 0, axis_inside = 0;
            for (int k = kbox[a].begin; k < kbox[a].end; k += s.k(a)) {
              ++axis_tiles;
              axis_inside += k >= inter.begin && k + s.k(a) <= inter.end && k + s.k(a) <= kbox[a].end;
            }
            tiles *= axis_tiles;
            unmasked *= axis_inside;
          }
          e.warp_tiles += tiles;
          e.masked_warp_tiles += tiles - unmasked;
        }
        if (c.wgmma) {
          // A warpgroup computes whole, for its 64 rows, every key tile of the key
          // box that meets its queries' windows (with one warpgroup: every tile; the
          // union of a box of queries' windows is the key box).
          for (int g = 0; g < c.warps / 4; ++g) {
            double tiles = 1;
            for (int a = 0; a < kMaxRank; ++a) {
              const Range& r = group_keys[g][a];
              int axis_tiles = 0;
              for (int k = kbox[a].begin; k < kbox[a].end; k += s.k(a))
                axis_tiles += k < std::min(r.end, kbox[a].end) && k + s.k(a) > r.begin;
              tiles *= axis_tiles;
            }
            e.computed_pairs += tiles * s.keys() * 64;
            e.visited_pairs += tiles * s.keys() * 64;
          }
        }
      }
  // Cost per needed pair: charged_pairs, and for each key tile a fixed overhead
  // (loads, barriers, tile bookkeeping) of about 24 keys' worth of work.
  // wgmma: a computed pair costs 0.54 of a charged mma.sync pair, and a key tile a
  // warp masks element by element 1.3x an unmasked one. Fitted to the H200 sweep of
  // commit 2145f1f (docs/performance.md): the mask term orders the 3-D, 2-D and
  // FLUX candidates as measured (3-D keys 2x4x8 vs 1x4x16: same pairs, 65% vs 92% of
  // tiles masked, 6.28 vs 6.70 ms); the factor makes wgmma / mma.sync cost ratios
  // 0.46-0.64 where the times' ratios were 0.66-0.72 (0.93 at 56² k7, head dim 64).
  // Warp-specialized (8 warps): 0.79 of the one-warpgroup kernel's time at equal
  // pairs on the five head-dim-128 anchors (0.78-0.85, H200, commit caa4075); at head
  // dim 64 it runs 1 CTA per SM against 3 and lost 1.2-1.5x on small problems
  // (56² k7, 1-D 4096 w255), so it is charged so as to be chosen only there.
  const double wgmma_rate = c.warps == 8 ? (c.head_dim >= 128 ? 0.43 : 0.7) : 0.54;
  const double charged =
      c.wgmma ? wgmma_rate * e.computed_pairs * (1.0 + 0.3 * e.masked_fraction()) : charged_pairs(e);
  // 8 warps share each K/V tile among 128 queries: 3-7% faster than 4 at head dim
  // 128, where register use allows 2 CTAs of 4 warps either way (1-D w2048 3.91 vs
  // 4.20 ms, 3-D 16x48x80 39.1 vs 42.3 ms, H200). At head dims <= 64 the 4-warp
  // kernels run 3-4 CTAs per SM and 8 warps lose (NAT 56x56 k7: 0.93 vs 0.48 ms).
  const double warps_factor = c.warps == 8 && !c.wgmma ? (c.head_dim >= 128 ? 0.93 : 1.5) : 1.0;
  // Two boxes per warp measured 1.0-1.6x slower than one (H200).
  const double m_factor = c.m_tiles == 2 ? 1.2 : 1.0;
  // 128-key warp-specialized tiles: the per-tile term above makes them 0.86-0.96 of
  // the 64-key cost on the anchors, where they measured 0.92-0.94 on the unmasked
  // (strided) ones and 1.11-1.19 on the masked 2-D k31 and 3-D k8x16x24 (H100,
  // commit 5385073); 1.1 ranks all five as measured (1-D w2048, a tie, goes to 128).
  const double kv128_factor = c.wgmma && c.block_kv == 128 ? 1.1 : 1.0;
  e.cost = (e.needed_pairs > 0 ? charged / e.needed_pairs : 0) * (1.0 + 24.0 / c.block_kv) * warps_factor * m_factor *
           kv128_factor;
  return e;
}

int halo_rows_bound(const Problem& p, const TileShape& s) {
  const Neighborhood nb = p.neighborhood();
  int64_t rows = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int64_t bound = int64_t(s.q(a)) + ax.kernel + ax.stride - 2;
    rows *= ax.periodic ? bound : std::min<int64_t>(bound, ax.group_length(0));
  }
  return int(std::min<int64_t>(rows, 1 << 30));
}

std::string halo_refusal(const Problem& p, const TileConfig& c, int query_tensors) {
  if (!c.halo) return "";
  if (p.additional_tokens > 0) return "halo: additional tokens run on the tiled kernels";
  const int rows = halo_rows_bound(p, c.shape);
  const int64_t bytes = halo_shared_bytes(query_tensors * c.warps * 16, c.head_dim, std::min(rows, 1 << 24));
  if (bytes > kHaloMaxSharedBytes)
    return "halo: a key box of up to " + std::to_string(rows) + " keys needs " + std::to_string(bytes) +
           " bytes of shared memory, over " + std::to_string(kHaloMaxSharedBytes);
  return "";
}

KeyTileCount key_tile_count(const Problem& p, const TileShape& s) {
  const Neighborhood nb = p.neighborhood();
  const SampledQueries q = sampled_queries(p, nb);
  double loaded = 1, inside = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    const int lg = ax.group_length(q.group[a]);
    double axis_loaded = 0, axis_inside = 0;
    for (int t = q.indices[a].begin; t < q.indices[a].end; t += s.q(a)) {
      const Range keys = ax.window_union({t, std::min(t + s.q(a), q.indices[a].end)}, lg);
      for (int k = keys.begin; k < keys.end; k += s.k(a)) {
        ++axis_loaded;
        axis_inside += !ax.periodic || (k >= 0 && k + s.k(a) <= lg);
      }
    }
    loaded *= axis_loaded;
    inside *= axis_inside;
  }
  return {loaded, loaded - inside};
}

bool halo_by_default(const Problem& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.rank > 2) return false;
  for (int a = 0; a < p.rank; ++a)
    if (p.kernel[a] > kHaloDefaultMaxKernel) return false;
  return true;
}

std::vector<PlanEstimate> rank_configs(const Problem& p, bool hopper) {
  const int rank = p.rank;
  const int bucket = head_dim_bucket(p.dim, p.value_dim());
  std::vector<PlanEstimate> out;
  if (!bucket) return out;
  double best_tiled = std::numeric_limits<double>::infinity();
  for (const TileConfig& c : candidate_configs(p.dtype, rank, bucket, hopper)) {
    out.push_back(estimate(p, c));
    out.back().candidate = int(out.size()) - 1;
    if (!c.halo) best_tiled = std::min(best_tiled, out.back().cost);
  }
  // The halo entries have no pair-count model: where measured faster (halo_by_default)
  // they cost kHaloCostFactor of the best tiled entry (the halo forward's times were
  // 0.57-0.75 of the tiled one's, H100), the preferred warp count first (8 warps at
  // head dim 32: 1.05-1.14x faster than 4 on DiNAT, NAT-Tiny stages 2-3 and 1-D, 0.94x
  // on NAT 56²; 4 warps at 64: 1.33x); elsewhere they run only when forced.
  constexpr double kHaloCostFactor = 0.6;
  for (PlanEstimate& e : out) {
    const TileConfig& c = e.config;
    if (!c.halo) continue;
    e.refused = halo_refusal(p, c);
    if (e.refused.empty() && !halo_by_default(p))
      e.refused = "halo: measured faster only on rank 1-2 windows of at most " + std::to_string(kHaloDefaultMaxKernel) +
                  " (a tie at 3-D k5); NBHD_FUSED_TILE forces it";
    const bool preferred = c.warps == (c.head_dim <= 32 ? 8 : 4);
    e.cost = e.refused.empty() ? kHaloCostFactor * best_tiled * (preferred ? 1.0 : 1.05)
                               : std::numeric_limits<double>::infinity();
  }
  std::stable_sort(out.begin(), out.end(), [](const PlanEstimate& a, const PlanEstimate& b) { return a.cost < b.cost; });
  return out;
}

namespace {

// One tensor whose tiles a TMA producer copies: its layout, heads, columns and the
// tile (group indices per axis) one copy holds.
struct TmaOperand {
  const char* what;
  const detail::TokenLayout& layout;
  int64_t heads, columns;
  int tile[kMaxRank];
};

// What every TMA producer needs of the problem and of its operands: "" and their
// views, or the reason it copies by cp.async.
std::string plan_tma_operands(const Problem& p, const TileConfig& c, std::initializer_list<TmaOperand> operands,
                              TmaView* views) {
  const char* loads = std::getenv("NBHD_FUSED_LOADS");
  if (!loads || std::strcmp(loads, "tma") != 0)
    return "cp.async measured faster than the TMA producer on an H100; NBHD_FUSED_LOADS=tma selects TMA";
  if (p.any_periodic()) return "a periodic axis's key box wraps, which TMA's boxes do not";
  if (p.dim != c.head_dim || p.value_dim() != c.head_dim)
    return "dim " + std::to_string(p.dim) + " and dim_v " + std::to_string(p.value_dim()) + " do not fill the " +
           std::to_string(c.head_dim) + "-column tiles (their zero columns are cp.async's)";
  const Neighborhood nb = p.neighborhood();
  const int element_bytes = int(size_of(p.dtype)), box_cols = 128 / element_bytes;
  for (const TmaOperand& t : operands) {
    const std::string why =
        plan_tma_view(t.layout, nb, p.batch, t.heads, t.columns, element_bytes, t.tile, box_cols, views++);
    if (!why.empty()) return std::string(t.what) + ": " + why;
  }
  return "";
}

}  // namespace

std::string forward_tma_views(const Problem& p, const TileConfig& c, const detail::TokenLayout& q,
                              const detail::TokenLayout& k, const detail::TokenLayout& v, TmaView* views) {
  if (!c.wgmma || c.warps != 8) return "the TMA producer is the warp-specialized wgmma kernels' (8 warps)";
  if (p.additional_tokens > 0) return "additional tokens load by cp.async";
  if (p.has_query_box()) return "the query holds a sub-box's tokens, and the query's tensor map covers the grid";
  const TileShape& s = c.shape;
  return plan_tma_operands(p, c,
                           {{"query", q, p.heads, p.dim, {s.w(0), s.w(1), s.w(2)}},
                            {"key", k, p.kv_heads, p.dim, {s.k(0), s.k(1), s.k(2)}},
                            {"value", v, p.kv_heads, p.value_dim(), {s.k(0), s.k(1), s.k(2)}}},
                           views);
}

std::string key_pass_tma_views(const Problem& p, const TileConfig& c, const detail::TokenLayout& q,
                               const detail::TokenLayout& dout, TmaView* views) {
  if (!c.wgmma) return "the TMA producer is the wgmma key pass's";
  if (p.has_query_box()) return "the query and d_out hold a sub-box's tokens, and their tensor maps cover the grid";
  const TileShape& s = c.shape;  // k_log2: the key pass's query tiles
  return plan_tma_operands(p, c,
                           {{"query", q, p.heads, p.dim, {s.k(0), s.k(1), s.k(2)}},
                            {"d_out", dout, p.heads, p.value_dim(), {s.k(0), s.k(1), s.k(2)}}},
                           views);
}

detail::TokenLayout contiguous_layout(const Problem& p, int64_t heads, int64_t dim) {
  detail::TokenLayout l;
  l.inner = 1;
  l.head = dim;
  int64_t stride = heads * dim;
  for (int a = kMaxRank - 1; a >= kMaxRank - p.rank; --a) {
    l.axis[a] = stride;
    stride *= p.extent[a - (kMaxRank - p.rank)];
  }
  l.batch = stride;
  return l;
}

std::vector<std::string> describe_plan(const Problem& p, bool hopper) {
  std::vector<std::string> lines;
  const auto ranked = rank_configs(p, hopper);
  if (ranked.empty()) {
    const int bucket = head_dim_bucket(p.dim, p.value_dim());
    lines.push_back(bucket ? std::string("fused: no ") + name(p.dtype) + " kernel for head dim " + std::to_string(bucket) +
                                 " in this build"
                           : "fused: no head-dim bucket holds max(dim, dim_v) = " +
                                 std::to_string(std::max(p.dim, p.value_dim())));
    return lines;
  }
  for (size_t i = 0; i < ranked.size(); ++i) {
    const PlanEstimate& e = ranked[i];
    const TileShape& s = e.config.shape;
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "fused %s #%d q %dx%dx%d box %dx%dx%d kv %dx%dx%d (%s, warps %d x %d boxes, kv %d, d %d): %.2fx pairs, cost %.3g  [%s]",
                  i == 0 ? "CHOSEN  " : "rejected", e.candidate, s.q(0), s.q(1), s.q(2), s.w(0), s.w(1), s.w(2), s.k(0), s.k(1),
                  s.k(2), e.config.halo ? "halo" : e.config.wgmma ? (e.config.warps == 8 ? "wgmma-ws" : "wgmma") : "mma.sync",
                  e.config.warps, e.config.m_tiles, e.config.block_kv,
                  e.config.head_dim, e.waste(), e.cost, e.config.why);
    lines.push_back(buf + (e.refused.empty() ? "" : " (" + e.refused + ")"));
  }
  if (p.any_periodic() && ranked.front().config.halo) {
    lines.push_back("fused periodic: the halo kernel loads its key box row by row, each row's token wrapped where it "
                    "must (no seam tiles); the backward's halo passes likewise");
  } else if (p.any_periodic()) {
    // How many of the chosen plan's query tiles have a key box past a group's end.
    const TileShape& s = ranked.front().config.shape;
    const Neighborhood nb = p.neighborhood();
    std::string axes;
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = nb.axis[a];
      if (!ax.periodic) continue;
      const int lg = ax.group_length(0), tiles = (lg + s.q(a) - 1) / s.q(a);
      int wrapping = 0;
      for (int t = 0; t < tiles; ++t) {
        const Range r = ax.window_union({t * s.q(a), std::min((t + 1) * s.q(a), lg)}, lg);
        wrapping += r.begin < 0 || r.end > lg;
      }
      axes += (axes.empty() ? "" : ", ") + std::string("axis ") + std::to_string(a - (kMaxRank - p.rank)) + ": " +
              std::to_string(wrapping) + " of " + std::to_string(tiles) + " query tiles";
    }
    lines.push_back("fused periodic: key boxes that wrap (their key tiles at the seam load row by row): " + axes +
                    " (dilation group 0); the backward's query and key tiles at the seam likewise");
    // What the periodic axes cost the chosen plan: the key tiles its CTAs load against
    // the same problem's without them (no window is shifted at a border, so the border
    // tiles' key boxes are as wide as the middle ones'), and the share that wraps.
    Problem flat = p;
    flat.periodic = {};
    const KeyTileCount with = key_tile_count(p, s), without = key_tile_count(flat, s);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "fused periodic cost: %.0f key tiles loaded (%+.1f%% over the problem without periodic axes), %.0f "
                  "of them wrap (%.1f%%), dilation group 0",
                  with.loaded, without.loaded > 0 ? 100.0 * (with.loaded / without.loaded - 1) : 0.0, with.wrapped,
                  with.loaded > 0 ? 100.0 * with.wrapped / with.loaded : 0.0);
    lines.push_back(buf);
  }
  TmaView views[3];
  const std::string why = forward_tma_views(p, ranked.front().config, contiguous_layout(p, p.heads, p.dim),
                                            contiguous_layout(p, p.kv_heads, p.dim),
                                            contiguous_layout(p, p.kv_heads, p.value_dim()), views);
  lines.push_back(why.empty() ? "fused loads: TMA (q, k and v as tensor maps over the token grid; contiguous tensors)"
                              : "fused loads: cp.async (" + why + ")");
  return lines;
}

}  // namespace nbhd::cuda::fused
