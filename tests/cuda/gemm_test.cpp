// SPDX-License-Identifier: Apache-2.0
// The gemm CUDA backend (src/cuda/gemm, docs/gemm.md) against the CPU reference.
//
// CPU (no GPU needed): slab plans cover every slot of a row once; the PN scatter / NN
// gather and the IN gather, replayed on the host with the kernels' own index code
// (cuda/gemm/geometry.hpp), reach every (query, slot) pair of the spec oracle exactly
// once, at the key the spec names (the token its key row is loaded from, wrapped row
// by row past a periodic axis's seam), inside the shared-memory tile, and never in a
// chunk the per-warp skipping drops; shared-memory sizing fits its budget; the
// planner's tables hold valid shapes. Problems draw periodic axes.
//
// GPU: seeded random problems (ranks 1-3, extents that are not tile multiples,
// unequal dilation groups, strides, every causal combination, periodic axes, GQA,
// Dv != D, head dims 1-128, additional tokens, rpb in the dtype or float32, padded
// strides) in float32,
// float16 and bfloat16: forward, backward and every unfused operation; the same with
// slabs capped small (NBHD_GEMM_SLAB_SLOTS) so rows go through several slabs and the
// naive softmax; hand-picked problems (head dims up to 256, windows of ~10^3 slots,
// blocked and full attention); transposed head dims; element offsets past 2^31 in
// each tensor, forward and backward; the qk weights equal the naive backend's; errors.
//
// Tolerances.
// - Forward: float16 / bfloat16 the flash-attention rule (testing.hpp). float32 runs
//   three tf32 products per product (docs/gemm.md). Expected ~2^-21 relative each, but
//   measured on an H200 up to 1.3e-5 relative on out (the unfused operations stay under
//   1e-5): |err| <= 3e-5 (|ref| + max(1, max |ref|)), tf32-class accuracy, which the
//   issue allows; why it is not float32-class is not yet understood.
// - lse: 1e-4 absolute + 1e-5 relative, as the naive tests.
// - Unfused operations: as the naive tests (2 ulps of the output dtype relative, 1e-5
//   of the largest value absolute, 1e-4 for sums over all tokens): their inputs are
//   already in the dtype, the products exact, the sums float32.
// - Gradients: the backward rounds its float32 probabilities and score gradients to
//   the dtype for the tensor cores (as flash attention does), so beside 2 ulps
//   relative they get an absolute term of two roundings at the largest value: 2^-10
//   (float16), 2^-7 (bfloat16) of max |ref|; float32 1e-4 as naive. A missing or
//   extra term moves a value by O(1/10) of the largest.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/element.hpp"
#include "cpu/reference.hpp"
#include "cuda/gemm/geometry.hpp"
#include "cuda/gemm/plan.hpp"
#include "cuda_testing.hpp"

namespace nbhd {
namespace {

using testing::built;
using testing::DeviceTensor;
using testing::HostTensor;
using testing::Inputs;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::vector<int64_t> shape_of(const TensorRef& t) { return {t.shape, t.shape + t.ndim}; }
std::vector<int64_t> with_last(std::vector<int64_t> s, int64_t last) {
  s.back() = last;
  return s;
}
std::vector<int64_t> without_last(std::vector<int64_t> s) {
  s.pop_back();
  return s;
}

#define NBHD_REQUIRE_GEMM() \
  if (!built(Backend::kGemm)) GTEST_SKIP() << "the gemm backend is not in this build (NBHD_BACKENDS)"

Options options_for(Backend b) {
  Options o;
  o.backend = b;
  return o;
}

// Whether this build runs `p` on the gemm backend; only the build's dtype filter may
// say no (anything else is a bug in the test or the backend).
bool runs(const Problem& p) {
  const Status s = can_run(Backend::kGemm, p, Device::kCUDA);
  if (!s.ok()) EXPECT_NE(s.message().find("in this build"), std::string::npos) << s.message();
  return s.ok();
}

// A packed copy of the logical values of a host tensor, in `dtype`.
HostTensor convert(const TensorRef& t, DType dtype) {
  if (!t.defined()) return HostTensor();
  HostTensor out(dtype, shape_of(t));
  for (int64_t i = 0; i < out.numel(); ++i) {
    int64_t offset = 0, rest = i;
    for (int d = t.ndim - 1; d >= 0; --d) {
      offset += (rest % t.shape[d]) * t.stride[d];
      rest /= t.shape[d];
    }
    out.set(i, cpu::load(t, offset));
  }
  return out;
}

// A tensor of `shape` whose every element is NaN: the kernels must write them all.
HostTensor poisoned(DType dtype, const std::vector<int64_t>& shape, int64_t gap) {
  HostTensor t(dtype, shape, gap);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, kNaN);
  return t;
}

double two_ulps(DType t) {
  switch (t) {
    case DType::kFloat16:
      return std::ldexp(1.0, -9);
    case DType::kBFloat16:
      return std::ldexp(1.0, -6);
    default:
      return 1e-5;
  }
}

// Absolute tolerance of gradients, as a fraction of the largest value (file comment).
double gradient_atol(DType t) {
  switch (t) {
    case DType::kFloat16:
      return std::ldexp(1.0, -10);
    case DType::kBFloat16:
      return std::ldexp(1.0, -7);
    default:
      return 1e-4;
  }
}

// |got - ref| <= rtol |ref| + atol_factor * max(1, max |ref|); infinities must match
// exactly, NaN never passes.
void expect_match(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref, double rtol,
                  double atol_factor) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double scale = 1;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::abs(r));
  const double atol = atol_factor * scale;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const bool ok = std::isinf(ref[i]) ? got[i] == ref[i] : std::abs(got[i] - ref[i]) <= atol + rtol * std::abs(ref[i]);
    if (!ok) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << ref[i] << " (tolerance "
                    << atol + rtol * std::abs(ref[i]) << ")";
      ++bad;
    }
  }
}

Problem make_problem(int rank, std::array<int64_t, 3> extent, std::array<int64_t, 3> kernel,
                     std::array<int64_t, 3> dilation, std::array<int64_t, 3> stride, std::array<bool, 3> causal,
                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t dim_v, int64_t extra,
                     bool rpb, DType dtype) {
  Problem p;
  p.rank = rank;
  p.extent = extent;
  p.kernel = kernel;
  p.dilation = dilation;
  p.stride = stride;
  p.causal = causal;
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.dim = dim;
  p.dim_v = dim_v;
  p.additional_tokens = extra;
  p.has_rpb = rpb;
  p.dtype = dtype;
  return p;
}

// `p` with periodic axes (padded like the other per-axis arrays: rank-1 problems use
// index 0).
Problem with_periodic(Problem p, std::array<bool, 3> periodic) {
  p.periodic = periodic;
  return p;
}

// ============================================================================
// CPU: slabs, the kernels' index geometry replayed, shared memory, the planner
// ============================================================================

using cuda::TileShape;

// Axes are sometimes periodic (alone or with dilation, stride, rpb, GQA, additional
// tokens), as in the naive and fused tests.
Problem random_cpu_problem(int seed, int max_extent = 0) {
  std::mt19937_64 rng(73000 + seed);
  testing::RandomOptions o;
  o.rank = 1 + seed % 3;
  o.dtype = DType::kFloat32;
  o.max_extent = max_extent;
  o.allow_periodic = true;
  return testing::random_problem(rng, o);
}

// Per padded axis and coordinate, the spec's neighbors in window order (the slot
// order): its window entries as tokens, a periodic entry taken modulo the group
// length. Elsewhere that is the ascending neighbor list, which it is checked against.
struct SpecLists {
  std::vector<std::vector<int>> axis[kMaxRank];
  explicit SpecLists(const Neighborhood& nb) {
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = nb.axis[a];
      const testing::SpecAxis spec{ax.length, ax.kernel, ax.dilation, ax.stride, ax.causal, ax.periodic};
      for (int x = 0; x < ax.length; ++x) {
        const int g = x % ax.dilation, lg = ax.group_length(g);
        std::vector<int> list;
        for (int w : testing::spec_axis_window(spec, x)) list.push_back(g + ax.dilation * (((w % lg) + lg) % lg));
        if (!ax.periodic) EXPECT_EQ(list, testing::spec_axis_neighbors(spec, x));
        axis[a].push_back(list);
      }
    }
  }
  // Whether slot `slot` of the query at `query` holds a neighbor, and which key.
  bool neighbor(const Neighborhood& nb, const int* query, int slot, int* key) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int o = slot % nb.axis[a].kernel;
      slot /= nb.axis[a].kernel;
      const std::vector<int>& list = axis[a][query[a]];
      if (o >= int(list.size())) return false;
      key[a] = list[o];
    }
    return true;
  }
};

int64_t flat_token(const Neighborhood& nb, const int* x) {
  return (int64_t(x[0]) * nb.axis[1].length + x[1]) * nb.axis[2].length + x[2];
}

template <class F>
void for_each_grid_token(const Neighborhood& nb, F&& f) {
  for (int x0 = 0; x0 < nb.axis[0].length; ++x0)
    for (int x1 = 0; x1 < nb.axis[1].length; ++x1)
      for (int x2 = 0; x2 < nb.axis[2].length; ++x2) {
        const int x[kMaxRank] = {x0, x1, x2};
        f(x);
      }
}

// Every (query, slot) hit exactly once when it holds a neighbor or an additional
// token, never otherwise.
void expect_hits_once(const Neighborhood& nb, const SpecLists& spec, int M, const std::vector<int>& hits,
                      const std::string& what) {
  const int W = cuda::gemm::window_slots(nb);
  int failures = 0;
  for_each_grid_token(nb, [&](const int* q) {
    for (int slot = 0; slot < W + M; ++slot) {
      int key[kMaxRank];
      const int want = slot >= W || spec.neighbor(nb, q, slot, key) ? 1 : 0;
      const int got = hits[flat_token(nb, q) * (W + M) + slot];
      if (got != want && failures++ < 5)
        ADD_FAILURE() << what << ": query (" << q[0] << "," << q[1] << "," << q[2] << ") slot " << slot << " hit "
                      << got << " times, expected " << want;
    }
  });
  ASSERT_EQ(failures, 0) << what;
}

// Replays PN's scatter (NN's gather is the same rule) over every query tile of
// batch 0, head 0: per slab, key tile, warp, 8-key chunk, key and row, exactly the
// kernels' tests and index arithmetic (pn.cu, nn.cu).
void replay_query_tiles(const Problem& p, const TileShape& shape, int capacity, int unit) {
  using namespace cuda::gemm;
  const Neighborhood nb = p.neighborhood();
  const SpecLists spec(nb);
  const int W = window_slots(nb), M = int(p.additional_tokens);
  const SlabPlan slabs = plan_slabs(nb, M, capacity);
  const int cols = pn_smem(16, slabs.slots, unit, 2).tile_cols;
  int tiles_per_group[kMaxRank];
  int64_t tiles = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    tiles_per_group[a] = ceil_div(nb.axis[a].group_length(0), shape.q(a));
    tiles *= int64_t(tiles_per_group[a]) * nb.axis[a].dilation;
  }
  const int last[kMaxRank] = {nb.axis[0].length - 1, nb.axis[1].length - 1, nb.axis[2].length - 1};
  std::vector<int> hits(size_t(flat_token(nb, last) + 1) * (W + M), 0);
  int failures = 0;
  auto fail = [&](const std::string& m) {
    if (failures++ < 5) ADD_FAILURE() << m;
  };
  for (int64_t t = 0; t < tiles; ++t) {
    GroupTile qt;
    if (!decode_group_tile(nb, tiles_per_group, shape.q_log2, t, qt)) continue;
    QueryRow rows[kBlockQ];
    for (int r = 0; r < kBlockQ; ++r) rows[r] = query_row(nb, shape, qt, r);
    int extent[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) extent[a] = shape.q(a);
    const Extremes cta = extremes(nb, qt.lg, qt.origin, extent);
    Extremes wx[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      int first[kMaxRank], wext[kMaxRank];
      shape.warp_offset(w, first);
      for (int a = 0; a < kMaxRank; ++a) {
        first[a] += qt.origin[a];
        wext[a] = shape.w(a);
      }
      wx[w] = extremes(nb, qt.lg, first, wext);
    }
    for (int si = 0; si < slabs.count(); ++si) {
      const Slab slab = slab_at(slabs, nb, M, si);
      const int s_base = slab.s0 - slab.s0 % unit;
      if (slab.s1 - s_base > cols) fail("slab wider than the tile");
      const Box box = slab_box(cta, slab);
      const KeyTiles kt = key_tiles(box, shape);
      for (int ti = 0; ti < kt.total; ++ti) {
        int origin[kMaxRank];
        key_tile_origin(kt, box, shape, ti, origin);
        // The token each row of the key tile is loaded from (device.cuh, window_source
        // and load_key_tile): the origin's plus linear offsets, or row by row from the
        // packed offsets where the tile reaches past a periodic axis's group end.
        const int kext[kMaxRank] = {shape.k(0), shape.k(1), shape.k(2)};
        const bool wraps = cuda::tile_wraps(nb, qt.group, origin, kext);
        int origin_token[kMaxRank] = {0, 0, 0};
        if (!wraps) token_of(nb, qt.group, origin, origin_token);
        auto loaded_token = [&](int n, int* token) {
          int off[kMaxRank];
          shape.key_offset(n, off);
          if (wraps) {
            cuda::packed_token(nb, qt.group, origin, off[0] | (off[1] << 10) | (off[2] << 20), token);
          } else {
            for (int a = 0; a < kMaxRank; ++a) token[a] = origin_token[a] + off[a] * nb.axis[a].dilation;
          }
        };
        for (int w = 0; w < kWarps; ++w) {
          const Box wbox = slab_box(wx[w], slab);
          for (int chunk = 0; chunk < kBlockK / kChunkKeys; ++chunk) {
            const bool active = !wx[w].empty && chunk_active(shape, origin, wbox, chunk);
            for (int n = chunk * kChunkKeys; n < (chunk + 1) * kChunkKeys; ++n) {
              int off[kMaxRank], kc[kMaxRank];
              shape.key_offset(n, off);
              bool inside = true;  // the kernels load the key's row
              for (int a = 0; a < kMaxRank; ++a) {
                kc[a] = origin[a] + off[a];
                inside = inside && box.r[a].contains(kc[a]);
              }
              const int code = key_code(nb, kc);
              for (int row = w * 16; row < w * 16 + 16; ++row) {
                const RowSlab rs = row_slab(rows[row], slab, s_base, row, cols, W);
                if (!(in(kc[0], rs.key[0]) && in(kc[1], rs.key[1]) && in(kc[2], rs.key[2]))) continue;
                if (!active) fail("a skipped chunk holds a neighbor");
                if (!inside) fail("a neighbor outside the key box");
                const int col = code - rs.base - row * cols, slot = col + s_base;
                if (col < 0 || col >= cols) fail("tile column out of range");
                if (slot < slab.s0 || slot >= slab.s1) fail("slot outside the slab");
                int query[kMaxRank], key[kMaxRank], want[kMaxRank];
                token_of(nb, qt.group, rows[row].j, query);
                loaded_token(n, key);
                if (!spec.neighbor(nb, query, slot, want) || !std::equal(key, key + kMaxRank, want)) {
                  fail("slot " + std::to_string(slot) + " of query (" + std::to_string(query[0]) + "," +
                       std::to_string(query[1]) + "," + std::to_string(query[2]) + ") is not key (" +
                       std::to_string(key[0]) + "," + std::to_string(key[1]) + "," + std::to_string(key[2]) + ")");
                  continue;
                }
                ++hits[flat_token(nb, query) * (W + M) + slot];
              }
            }
          }
        }
      }
      for (int m = slab.m0; m < slab.m1; ++m)
        for (int row = 0; row < kBlockQ; ++row) {
          if (!rows[row].valid) continue;
          const RowSlab rs = row_slab(rows[row], slab, s_base, row, cols, W);
          const int col = rs.extra_base + m - row * cols;
          if (col < 0 || col >= cols || col + s_base != W + m) fail("additional token column");
          int query[kMaxRank];
          token_of(nb, qt.group, rows[row].j, query);
          ++hits[flat_token(nb, query) * (W + M) + W + m];
        }
    }
  }
  ASSERT_EQ(failures, 0);
  expect_hits_once(nb, spec, M, hits, "query tiles");
}

// Replays IN's gather over every key tile of batch 0, kv head 0 (in.cu).
void replay_inverse(const Problem& p, const TileShape& shape) {
  using namespace cuda::gemm;
  const Neighborhood nb = p.neighborhood();
  const SpecLists spec(nb);
  const int W = window_slots(nb);
  int tiles_per_group[kMaxRank];
  int64_t tiles = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    tiles_per_group[a] = ceil_div(nb.axis[a].group_length(0), shape.k(a));
    tiles *= int64_t(tiles_per_group[a]) * nb.axis[a].dilation;
  }
  const int last[kMaxRank] = {nb.axis[0].length - 1, nb.axis[1].length - 1, nb.axis[2].length - 1};
  std::vector<int> hits(size_t(flat_token(nb, last) + 1) * W, 0);
  int failures = 0;
  auto fail = [&](const std::string& m) {
    if (failures++ < 5) ADD_FAILURE() << m;
  };
  for (int64_t t = 0; t < tiles; ++t) {
    GroupTile kt;
    if (!decode_group_tile(nb, tiles_per_group, shape.k_log2, t, kt)) continue;
    Box ibox;
    int qcount[kMaxRank], qtiles = 1;
    for (int a = 0; a < kMaxRank; ++a) {
      ibox.r[a] =
          nb.axis[a].inverse_window_union({kt.origin[a], std::min(kt.origin[a] + shape.k(a), kt.lg[a])}, kt.lg[a]);
      qcount[a] = std::max(ceil_div(ibox.r[a].size(), shape.q(a)), 0);
      if (ibox.r[a].size() <= 0) fail("a key tile no query sees");
      qtiles *= qcount[a];
    }
    const int origin_code = key_code(nb, kt.origin);
    for (int qi = 0; qi < qtiles; ++qi) {
      int rest = qi, qorigin[kMaxRank];
      for (int a = kMaxRank - 1; a >= 0; --a) {
        qorigin[a] = ibox.r[a].begin + (rest % qcount[a]) * shape.q(a);
        rest /= qcount[a];
      }
      for (int r = 0; r < kBlockQI; ++r) {
        int off[kMaxRank], j[kMaxRank];
        cuda::box_offset(r, shape.q_log2, off);
        bool valid = true;
        for (int a = 0; a < kMaxRank; ++a) {
          j[a] = qorigin[a] + off[a];
          valid = valid && j[a] < ibox.r[a].end;
        }
        const InverseRow irow = inverse_row(nb, kt, j, valid);
        const Span* keys = irow.keys;
        const int base = irow.base;
        for (int n = 0; n < kBlockK; ++n) {
          int koff[kMaxRank];
          shape.key_offset(n, koff);
          if (!(in(koff[0], keys[0]) && in(koff[1], keys[1]) && in(koff[2], keys[2]))) continue;
          const int slot = origin_code + koff[0] * slot_stride(nb, 0) + koff[1] * slot_stride(nb, 1) + koff[2] - base;
          int kc[kMaxRank], query[kMaxRank], key[kMaxRank], want[kMaxRank];
          bool real_key = true;  // the CTA stores only its keys inside the group
          for (int a = 0; a < kMaxRank; ++a) {
            kc[a] = kt.origin[a] + koff[a];
            real_key = real_key && kc[a] < kt.lg[a];
          }
          token_of(nb, kt.group, j, query);
          token_of(nb, kt.group, kc, key);
          if (slot < 0 || slot >= W) {
            fail("IN: slot " + std::to_string(slot) + " outside the row");
            continue;
          }
          if (!real_key) continue;  // (periodic: a slot of the row, read but never stored)
          if (!spec.neighbor(nb, query, slot, want) || !std::equal(key, key + kMaxRank, want)) {
            fail("IN: slot " + std::to_string(slot) + " of query (" + std::to_string(query[0]) + "," +
                 std::to_string(query[1]) + "," + std::to_string(query[2]) + ")");
            continue;
          }
          ++hits[flat_token(nb, query) * W + slot];
        }
      }
    }
  }
  ASSERT_EQ(failures, 0);
  expect_hits_once(nb, spec, 0, hits, "key tiles");
}

TEST(GemmSlabs, CoverEverySlotOnce) {
  using namespace cuda::gemm;
  for (int seed = 0; seed < 200; ++seed) {
    Problem p = random_cpu_problem(seed, seed % 2 ? 0 : 40);
    p.additional_tokens = seed % 4;
    SCOPED_TRACE(p.to_string());
    const Neighborhood nb = p.neighborhood();
    const int W = window_slots(nb), M = int(p.additional_tokens);
    for (int capacity : {1, 2, 3, 5, 8, 13, 64, W, W + M, W + M + 7}) {
      SCOPED_TRACE("capacity " + std::to_string(capacity));
      const SlabPlan plan = plan_slabs(nb, M, capacity);
      EXPECT_EQ(plan.whole_row(), W + M <= capacity);
      EXPECT_LE(plan.slots, std::max(capacity, 1));
      std::vector<int> seen(W + M, 0);
      for (int i = 0; i < plan.count(); ++i) {
        const Slab s = slab_at(plan, nb, M, i);
        ASSERT_LT(s.s0, s.s1);
        EXPECT_LE(s.s1 - s.s0, plan.slots);
        for (int slot = s.s0; slot < s.s1; ++slot) ++seen[slot];
        if (!s.window) continue;
        // The offsets' slots are exactly the slab's window run.
        std::vector<int> slots;
        for (int o0 = s.offset[0].begin; o0 < s.offset[0].end; ++o0)
          for (int o1 = s.offset[1].begin; o1 < s.offset[1].end; ++o1)
            for (int o2 = s.offset[2].begin; o2 < s.offset[2].end; ++o2)
              slots.push_back((o0 * nb.axis[1].kernel + o1) * nb.axis[2].kernel + o2);
        std::sort(slots.begin(), slots.end());
        ASSERT_EQ(int(slots.size()), std::min(s.s1, W) - s.s0);
        for (size_t k = 0; k < slots.size(); ++k) ASSERT_EQ(slots[k], s.s0 + int(k));
        EXPECT_EQ(s.m1 - s.m0, s.s1 - s.s0 - int(slots.size()));
      }
      for (int slot = 0; slot < W + M; ++slot) ASSERT_EQ(seen[slot], 1) << "slot " << slot;
    }
  }
}

TEST(GemmGeometry, QueryTilesReachEveryNeighborOnce) {
  using namespace cuda::gemm;
  for (int seed = 0; seed < 60; ++seed) {
    // Half the problems on the tests' small grids, half on grids of several tiles.
    const int rank = 1 + seed % 3;
    Problem p = random_cpu_problem(seed, seed % 2 ? 0 : (rank == 1 ? 300 : rank == 2 ? 30 : 12));
    p.additional_tokens = seed % 3;
    SCOPED_TRACE(p.to_string());
    const int W = int(p.window_size()), M = int(p.additional_tokens);
    for (const ShapeChoice& c : query_candidates(p.rank)) {
      for (int capacity : {W + M, std::max(1, (W + M) / 3), W <= 200 ? 5 : W / 2}) {
        SCOPED_TRACE(std::string(c.why) + ", capacity " + std::to_string(capacity));
        replay_query_tiles(p, c.shape, capacity, seed % 2 ? 4 : 8);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(GemmGeometry, KeyTilesReachEveryNeighborOnce) {
  using namespace cuda::gemm;
  for (int seed = 0; seed < 90; ++seed) {
    const int rank = 1 + seed % 3;
    const Problem p = random_cpu_problem(seed + 600, seed % 2 ? 0 : (rank == 1 ? 300 : rank == 2 ? 30 : 12));
    SCOPED_TRACE(p.to_string());
    for (const ShapeChoice& c : inverse_candidates(p.rank)) {
      SCOPED_TRACE(c.why);
      replay_inverse(p, c.shape);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(GemmPlan, CandidatesAreValidShapes) {
  using namespace cuda::gemm;
  for (int rank = 1; rank <= 3; ++rank) {
    for (const ShapeChoice& c : query_candidates(rank)) {
      SCOPED_TRACE(c.why);
      const TileShape& s = c.shape;
      EXPECT_EQ(s.q_log2[0] + s.q_log2[1] + s.q_log2[2], 6);  // kBlockQ = 64 queries
      EXPECT_EQ(s.w_log2[0] + s.w_log2[1] + s.w_log2[2], 4);  // 16 per warp
      EXPECT_EQ(s.k_log2[0] + s.k_log2[1] + s.k_log2[2], 6);  // kBlockK = 64 keys
      EXPECT_GE(s.k_log2[2], 3);                              // 8-key chunks along the innermost axis
      for (int a = 0; a < kMaxRank; ++a) {
        EXPECT_LE(s.w_log2[a], s.q_log2[a]);
        if (a < kMaxRank - rank) EXPECT_EQ(s.q_log2[a] + s.k_log2[a], 0) << "padded axis " << a;
      }
      // Query rows cover the tile once, each warp's rows its own box.
      std::vector<int> seen(kBlockQ, 0);
      for (int r = 0; r < kBlockQ; ++r) {
        int off[kMaxRank], woff[kMaxRank];
        s.query_offset(r, off);
        s.warp_offset(r / 16, woff);
        int flat = 0;
        for (int a = 0; a < kMaxRank; ++a) {
          EXPECT_GE(off[a], woff[a]);
          EXPECT_LT(off[a], woff[a] + s.w(a));
          flat = flat * s.q(a) + off[a];
        }
        ++seen[flat];
      }
      for (int v : seen) EXPECT_EQ(v, 1);
    }
    for (const ShapeChoice& c : inverse_candidates(rank)) {
      SCOPED_TRACE(c.why);
      const TileShape& s = c.shape;
      EXPECT_EQ(s.q_log2[0] + s.q_log2[1] + s.q_log2[2], 5);  // kBlockQI = 32 queries
      EXPECT_EQ(s.k_log2[0] + s.k_log2[1] + s.k_log2[2], 6);  // kBlockK = 64 keys
      for (int a = 0; a < kMaxRank - rank; ++a) EXPECT_EQ(s.q_log2[a] + s.k_log2[a], 0) << "padded axis " << a;
    }
  }
}

TEST(GemmPlan, SharedMemoryFitsTheBudget) {
  using namespace cuda::gemm;
  // H100 (227 KB per block, 228 per SM) and A100 (163 / 164 KB).
  for (SmemLimits limits : {SmemLimits{232448, 233472}, SmemLimits{166912, 167936}}) {
    for (int budget : {limits.two_per_sm(), limits.per_block_optin}) {
      for (int elem : {2, 4}) {
        for (int dim_pad = 16; dim_pad <= kMaxDim; dim_pad += 16)
          for (int weight_elem : {elem, 4}) {
            const int unit = 16 / weight_elem;
            const int c = pn_capacity(budget, dim_pad, elem, unit);
            if (c > 0) {
              EXPECT_LE(pn_smem(dim_pad, c, unit, elem).bytes, budget);
              EXPECT_GT(pn_smem(dim_pad, c + unit, unit, elem).bytes, budget);
            }
            // At half an SM, float32 head dims near 256 may not fit: the kernels then take
            // the opt-in maximum, where everything must.
            if (budget == limits.per_block_optin)
              EXPECT_GE(c, kMinSlabSlots) << "PN, head dim " << dim_pad << ", " << elem << "-byte elements";
          }
        for (int weight_elem : {elem, 4}) {
          const int unit = 16 / weight_elem;
          const int c = nn_capacity(budget, elem, weight_elem, unit);
          EXPECT_GT(c, kMinSlabSlots);
          EXPECT_LE(nn_smem(c, unit, elem, weight_elem).bytes, budget);
          EXPECT_GT(nn_smem(c + unit, unit, elem, weight_elem).bytes, budget);
        }
        EXPECT_LE(in_smem(elem).bytes, budget);
      }
    }
  }
  // The workspace's rows start on 16 bytes in every dtype.
  Problem p;
  p.rank = 2;
  p.extent = {9, 9, 0};
  p.kernel = {7, 7, 0};
  p.additional_tokens = 2;
  EXPECT_EQ(padded_slots(p), 56);
}

TEST(GemmPlan, PicksACandidateForEveryProblem) {
  using namespace cuda::gemm;
  const SmemLimits h100{232448, 233472};
  for (int seed = 0; seed < 60; ++seed) {
    const Problem p = random_cpu_problem(seed + 900, 40);
    SCOPED_TRACE(p.to_string());
    const Plan plan = make_plan(p, h100);
    EXPECT_GT(plan.query.cost, 0.99);  // at least the pairs needed
    EXPECT_GT(plan.inverse.cost, 0.99);
    bool found = false;
    for (const ShapeChoice& c : query_candidates(p.rank))
      found = found || std::equal(c.shape.q_log2, c.shape.q_log2 + kMaxRank, plan.query.shape.q_log2);
    EXPECT_TRUE(found);
    EXPECT_FALSE(describe_plan(p, h100).empty());
  }
}

TEST(GemmErrors, RejectedBeforeTouchingTheDevice) {
  if (!built(Backend::kGemm)) GTEST_SKIP() << "the gemm backend is not in this build (NBHD_BACKENDS)";
  Problem p =
      make_problem(1, {40, 0, 0}, {5, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 264, 0, 0, false, DType::kFloat16);
  Status s = can_run(Backend::kGemm, p, Device::kCUDA);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("256"), std::string::npos) << s.message();
  p.dim = 64;
  p.dtype = DType::kFloat64;
  s = can_run(Backend::kGemm, p, Device::kCUDA);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("float64"), std::string::npos) << s.message();
}

// ============================================================================
// GPU: the backend against the CPU reference
// ============================================================================

// Caps the slab width of every gemm kernel for a scope (NBHD_GEMM_SLAB_SLOTS).
class SlabCap {
 public:
  explicit SlabCap(int slots) { setenv("NBHD_GEMM_SLAB_SLOTS", std::to_string(slots).c_str(), 1); }
  SlabCap(const SlabCap&) = delete;
  SlabCap& operator=(const SlabCap&) = delete;
  ~SlabCap() { unsetenv("NBHD_GEMM_SLAB_SLOTS"); }
};

struct Inputs64 {
  HostTensor q, k, v, rpb, ak, av;
  Inputs64(const Inputs& in, const TensorRef& rpb_used)
      : q(convert(in.q.ref(), DType::kFloat64)),
        k(convert(in.k.ref(), DType::kFloat64)),
        v(convert(in.v.ref(), DType::kFloat64)),
        rpb(convert(rpb_used, DType::kFloat64)),
        ak(convert(in.ak.ref(), DType::kFloat64)),
        av(convert(in.av.ref(), DType::kFloat64)) {}
};

Problem as_float64(Problem p) {
  p.dtype = DType::kFloat64;
  return p;
}

void check_forward(const Problem& p, const Inputs& in, int64_t gap, bool rpb_float32 = false) {
  SCOPED_TRACE("forward, gap " + std::to_string(gap) + (rpb_float32 ? ", float32 rpb" : ""));
  const HostTensor rpb32 = rpb_float32 ? convert(in.rpb.ref(), DType::kFloat32) : HostTensor();
  const HostTensor& rpb = rpb_float32 ? rpb32 : in.rpb;
  const auto q_shape = shape_of(in.q.ref());
  HostTensor out = poisoned(p.dtype, with_last(q_shape, p.value_dim()), gap);
  HostTensor lse = poisoned(DType::kFloat32, without_last(q_shape), gap);
  {
    DeviceTensor q(in.q), k(in.k), v(in.v), b(rpb), ak(in.ak), av(in.av), o(out), l(lse);
    const Status s = forward(p, {q.ref(), k.ref(), v.ref(), b.ref(), ak.ref(), av.ref(), o.ref(), l.ref()},
                             options_for(Backend::kGemm));
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    o.copy_to(out);
    l.copy_to(lse);
  }
  const Inputs64 in64(in, rpb.ref());
  HostTensor exact(DType::kFloat64, shape_of(out.ref())), exact_lse(DType::kFloat32, shape_of(lse.ref()));
  ASSERT_TRUE(cpu::reference_forward(as_float64(p),
                                     {in64.q.ref(), in64.k.ref(), in64.v.ref(), in64.rpb.ref(), in64.ak.ref(),
                                      in64.av.ref(), exact.ref(), exact_lse.ref()},
                                     false)
                  .ok());
  if (p.dtype == DType::kFloat32) {
    // Measured on an H200: up to 1.3e-5 relative (file comment); 2e-6 failed 6 tests.
    expect_match("out", out.values(), exact.values(), 3e-5, 3e-5);
  } else {
    HostTensor plain(p.dtype, shape_of(out.ref()));
    ASSERT_TRUE(cpu::reference_forward(
                    p,
                    {in.q.ref(), in.k.ref(), in.v.ref(), rpb.ref(), in.ak.ref(), in.av.ref(), plain.ref(), TensorRef{}},
                    /*plain_low_precision=*/true)
                    .ok());
    testing::expect_close("out", p.dtype, out.values(), exact.values(), plain.values());
  }
  testing::expect_near("lse", lse.values(), exact_lse.values(), 1e-4, 1e-5);
}

void check_backward(const Problem& p, const Inputs& in, int64_t gap, std::mt19937_64& rng) {
  SCOPED_TRACE("backward, gap " + std::to_string(gap));
  const bool extra = p.additional_tokens > 0;
  const auto q_shape = shape_of(in.q.ref()), out_shape = with_last(q_shape, p.value_dim());
  HostTensor d_out(p.dtype, out_shape, gap);
  d_out.fill_random(rng);
  HostTensor out(p.dtype, out_shape), lse(DType::kFloat32, without_last(q_shape));
  HostTensor dq = poisoned(p.dtype, q_shape, gap), dk = poisoned(p.dtype, shape_of(in.k.ref()), gap),
             dv = poisoned(p.dtype, shape_of(in.v.ref()), gap);
  HostTensor drpb = p.has_rpb ? poisoned(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
  HostTensor dak = extra ? poisoned(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
  HostTensor dav = extra ? poisoned(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
  {
    DeviceTensor q(in.q), k(in.k), v(in.v), b(in.rpb), ak(in.ak), av(in.av), o(out), l(lse), g(d_out);
    DeviceTensor gq(dq), gk(dk), gv(dv), gb(drpb), gak(dak), gav(dav);
    BackwardTensors t;
    t.query = q.ref();
    t.key = k.ref();
    t.value = v.ref();
    t.rpb = b.ref();
    t.additional_keys = ak.ref();
    t.additional_values = av.ref();
    t.out = o.ref();
    t.lse = l.ref();
    t.d_out = g.ref();
    t.d_query = gq.ref();
    t.d_key = gk.ref();
    t.d_value = gv.ref();
    t.d_rpb = gb.ref();
    t.d_additional_keys = gak.ref();
    t.d_additional_values = gav.ref();
    const Status s = backward(p, t, options_for(Backend::kGemm));
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    gq.copy_to(dq);
    gk.copy_to(dk);
    gv.copy_to(dv);
    gb.copy_to(drpb);
    gak.copy_to(dak);
    gav.copy_to(dav);
  }
  const Problem p64 = as_float64(p);
  const Inputs64 in64(in, in.rpb.ref());
  const HostTensor d_out64 = convert(d_out.ref(), DType::kFloat64);
  HostTensor eq(DType::kFloat64, q_shape), ek(DType::kFloat64, shape_of(in.k.ref())),
      ev(DType::kFloat64, shape_of(in.v.ref()));
  HostTensor erpb = p.has_rpb ? HostTensor(DType::kFloat64, shape_of(in.rpb.ref())) : HostTensor();
  HostTensor eak = extra ? HostTensor(DType::kFloat64, shape_of(in.ak.ref())) : HostTensor();
  HostTensor eav = extra ? HostTensor(DType::kFloat64, shape_of(in.av.ref())) : HostTensor();
  BackwardTensors r;
  r.query = in64.q.ref();
  r.key = in64.k.ref();
  r.value = in64.v.ref();
  r.rpb = in64.rpb.ref();
  r.additional_keys = in64.ak.ref();
  r.additional_values = in64.av.ref();
  r.d_out = d_out64.ref();
  r.d_query = eq.ref();
  r.d_key = ek.ref();
  r.d_value = ev.ref();
  r.d_rpb = erpb.ref();
  r.d_additional_keys = eak.ref();
  r.d_additional_values = eav.ref();
  ASSERT_TRUE(cpu::reference_backward(p64, r).ok());
  const double rtol = p.dtype == DType::kFloat32 ? 1e-4 : two_ulps(p.dtype), atol = gradient_atol(p.dtype);
  expect_match("d query", dq.values(), eq.values(), rtol, atol);
  expect_match("d key", dk.values(), ek.values(), rtol, atol);
  expect_match("d value", dv.values(), ev.values(), rtol, atol);
  if (p.has_rpb) expect_match("d rpb", drpb.values(), erpb.values(), 1e-4, std::max(atol, 1e-4));
  if (extra) {
    expect_match("d additional_keys", dak.values(), eak.values(), rtol, atol);
    expect_match("d additional_values", dav.values(), eav.values(), rtol, atol);
  }
}

// Every unfused operation against the reference's, on the same inputs in the dtype.
void check_unfused(const Problem& p, const Inputs& in, int64_t gap, std::mt19937_64& rng) {
  SCOPED_TRACE("unfused, gap " + std::to_string(gap));
  const bool extra = p.additional_tokens > 0;
  const double rtol = two_ulps(p.dtype);
  const auto q_shape = shape_of(in.q.ref());
  const auto attn_shape = with_last(q_shape, p.window_size() + p.additional_tokens);
  const auto out_shape = with_last(q_shape, p.value_dim());
  const Options o = options_for(Backend::kGemm);

  HostTensor scores(p.dtype, attn_shape, gap);
  ASSERT_TRUE(cpu::reference_qk(p, {in.q.ref(), in.k.ref(), in.rpb.ref(), in.ak.ref(), scores.ref()}).ok());
  {
    HostTensor got = poisoned(p.dtype, attn_shape, gap);
    DeviceTensor q(in.q), k(in.k), b(in.rpb), ak(in.ak), a(got);
    const Status s = qk(p, {q.ref(), k.ref(), b.ref(), ak.ref(), a.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    a.copy_to(got);
    expect_match("qk", got.values(), scores.values(), rtol, 1e-5);
  }
  HostTensor probs(p.dtype, attn_shape, gap);
  ASSERT_TRUE(cpu::reference_softmax(p, {scores.ref(), probs.ref()}).ok());
  {
    HostTensor got = poisoned(p.dtype, attn_shape, gap);
    DeviceTensor a(scores), out(got);
    const Status s = softmax(p, {a.ref(), out.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(got);
    expect_match("softmax", got.values(), probs.values(), rtol, 1e-5);
  }
  {
    HostTensor want(p.dtype, out_shape, gap), got = poisoned(p.dtype, out_shape, gap);
    ASSERT_TRUE(cpu::reference_av(p, {probs.ref(), in.v.ref(), in.av.ref(), want.ref()}).ok());
    DeviceTensor a(probs), v(in.v), av(in.av), out(got);
    const Status s = nbhd::av(p, {a.ref(), v.ref(), av.ref(), out.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(got);
    expect_match("av", got.values(), want.values(), rtol, 1e-5);
  }
  {
    HostTensor d_out(p.dtype, out_shape, gap);
    d_out.fill_random(rng);
    HostTensor want_dp(p.dtype, attn_shape, gap), want_dv(p.dtype, shape_of(in.v.ref()), gap);
    HostTensor want_dav = extra ? HostTensor(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
    ASSERT_TRUE(cpu::reference_av_backward(p, {probs.ref(), in.v.ref(), in.av.ref(), d_out.ref(), want_dp.ref(),
                                               want_dv.ref(), want_dav.ref()})
                    .ok());
    HostTensor dp = poisoned(p.dtype, attn_shape, gap), dv = poisoned(p.dtype, shape_of(in.v.ref()), gap);
    HostTensor dav = extra ? poisoned(p.dtype, shape_of(in.av.ref()), gap) : HostTensor();
    DeviceTensor a(probs), v(in.v), av(in.av), g(d_out), gp(dp), gv(dv), gav(dav);
    const Status s = av_backward(p, {a.ref(), v.ref(), av.ref(), g.ref(), gp.ref(), gv.ref(), gav.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    gp.copy_to(dp);
    gv.copy_to(dv);
    gav.copy_to(dav);
    expect_match("av_backward d_probs", dp.values(), want_dp.values(), rtol, 1e-5);
    expect_match("av_backward d_value", dv.values(), want_dv.values(), rtol, 1e-5);
    if (extra) expect_match("av_backward d_additional_values", dav.values(), want_dav.values(), rtol, 1e-4);
  }
  {
    HostTensor d_probs(p.dtype, attn_shape, gap), want(p.dtype, attn_shape, gap), got(p.dtype, attn_shape, gap);
    d_probs.fill_random(rng);
    ASSERT_TRUE(cpu::reference_softmax_backward(p, {probs.ref(), d_probs.ref(), want.ref()}).ok());
    DeviceTensor a(probs), g(d_probs);
    const Status s = softmax_backward(p, {a.ref(), g.ref(), g.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    g.copy_to(got);
    expect_match("softmax_backward", got.values(), want.values(), rtol, 1e-5);
  }
  // qk backward; slots outside a causal window hold NaN, which must not be read.
  {
    HostTensor d_attn(p.dtype, attn_shape, gap);
    d_attn.fill_random(rng);
    const std::vector<double> s_values = scores.values();
    for (int64_t i = 0; i < d_attn.numel(); ++i)
      if (std::isinf(s_values[i])) d_attn.set(i, kNaN);
    HostTensor want_dq(p.dtype, q_shape, gap), want_dk(p.dtype, shape_of(in.k.ref()), gap);
    HostTensor want_drpb = p.has_rpb ? HostTensor(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
    HostTensor want_dak = extra ? HostTensor(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
    ASSERT_TRUE(cpu::reference_qk_backward(p, {in.q.ref(), in.k.ref(), in.ak.ref(), d_attn.ref(), want_dq.ref(),
                                               want_dk.ref(), want_drpb.ref(), want_dak.ref()})
                    .ok());
    HostTensor dq = poisoned(p.dtype, q_shape, gap), dk = poisoned(p.dtype, shape_of(in.k.ref()), gap);
    HostTensor drpb = p.has_rpb ? poisoned(DType::kFloat32, shape_of(in.rpb.ref()), gap) : HostTensor();
    HostTensor dak = extra ? poisoned(p.dtype, shape_of(in.ak.ref()), gap) : HostTensor();
    DeviceTensor q(in.q), k(in.k), ak(in.ak), g(d_attn), gq(dq), gk(dk), gb(drpb), gak(dak);
    const Status s = qk_backward(p, {q.ref(), k.ref(), ak.ref(), g.ref(), gq.ref(), gk.ref(), gb.ref(), gak.ref()}, o);
    ASSERT_TRUE(s.ok()) << s.message();
    gq.copy_to(dq);
    gk.copy_to(dk);
    gb.copy_to(drpb);
    gak.copy_to(dak);
    expect_match("qk_backward d_query", dq.values(), want_dq.values(), rtol, 1e-5);
    expect_match("qk_backward d_key", dk.values(), want_dk.values(), rtol, 1e-5);
    if (p.has_rpb) expect_match("qk_backward d_rpb", drpb.values(), want_drpb.values(), 1e-5, 1e-4);
    if (extra) expect_match("qk_backward d_additional_keys", dak.values(), want_dak.values(), rtol, 1e-4);
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
std::string dtype_label(DType t) { return name(t); }

// Random problems on grids of several tiles, head dims often multiples of 8 (the
// 16-byte paths) and sometimes past 64 (several head-dim chunks in PN); axes are
// sometimes periodic (alone or with dilation, stride, rpb, GQA, additional tokens:
// key boxes and IN's query boxes that reach past a group's ends), as in the naive and
// fused tests.
Problem random_case(std::mt19937_64& rng, int rank, DType dtype) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  testing::RandomOptions o;
  o.rank = rank;
  o.dtype = dtype;
  o.max_extent = rank == 1 ? 160 : rank == 2 ? 20 : 9;
  o.allow_periodic = true;
  Problem p = testing::random_problem(rng, o);
  const int64_t dims[] = {8, 16, 24, 32, 40, 64, 72, 96, 128};
  if (uniform(0, 1)) p.dim = dims[uniform(0, 8)];
  if (uniform(0, 2) == 0) p.dim_v = uniform(0, 1) ? dims[uniform(0, 8)] : uniform(1, 12);
  return p;
}

// Gaps: 0 (packed, 16-byte paths when the head dims allow), 8 (padded, still 16-byte
// aligned rows), 3 (element-wise paths).
int64_t gap_for(int seed) { return seed % 3 == 0 ? 0 : seed % 3 == 1 ? 8 : 3; }

// ---- small problems for compute-sanitizer (scripts/gpu-check style: GemmSmoke.*)

TEST(GemmSmoke, EveryOperationOnSmallProblems) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  int ran = 0;
  for (DType dtype : kDtypes) {
    const Problem problems[] = {
        // element-wise paths (head dim 5), causal, dilation, stride, GQA, extras, rpb
        make_problem(2, {7, 6, 0}, {3, 4, 0}, {2, 1, 1}, {1, 2, 1}, {true, false, false}, 2, 4, 2, 5, 3, 2, true,
                     dtype),
        // 16-byte paths, a partial query tile, two head-dim chunks
        make_problem(1, {70, 0, 0}, {5, 0, 0}, {1, 1, 1}, {2, 1, 1}, {}, 1, 2, 1, 80, 16, 1, true, dtype),
        make_problem(3, {3, 5, 9}, {3, 3, 5}, {1, 1, 1}, {1, 1, 2}, {false, true, false}, 1, 2, 2, 16, 24, 0, true,
                     dtype),
        // periodic axes: key boxes past both ends of a group (unequal groups on axis 0),
        // beside a causal axis; GQA, extras, rpb
        with_periodic(make_problem(2, {11, 21, 0}, {5, 7, 0}, {2, 1, 1}, {1, 2, 1}, {false, true, false}, 1, 4, 2, 16,
                                   8, 1, true, dtype),
                      {true, false, false}),
        with_periodic(make_problem(1, {70, 0, 0}, {9, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 2, 1, 40, 40, 0, true, dtype),
                      {true, false, false})};
    for (const Problem& p : problems) {
      if (!runs(p)) continue;
      ++ran;
      SCOPED_TRACE(p.to_string());
      for (int cap : {0, 4}) {
        SCOPED_TRACE("slab cap " + std::to_string(cap));
        std::unique_ptr<SlabCap> limit = cap ? std::make_unique<SlabCap>(cap) : nullptr;
        std::mt19937_64 rng(17);
        const Inputs in(p, rng);
        check_forward(p, in, 0);
        check_backward(p, in, 0, rng);
        check_unfused(p, in, 0, rng);
      }
    }
  }
  if (ran == 0) GTEST_SKIP() << "this build has no gemm kernels for these problems' dtypes (NBHD_DTYPES)";
}

// ---- random problems

class GemmRandom : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(GemmRandom, Forward) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 12; ++seed) {
    std::mt19937_64 rng(410000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_case(rng, rank, dtype);
    if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = gap_for(seed);
    const Inputs in(p, rng, gap);
    check_forward(p, in, gap, /*rpb_float32=*/p.has_rpb && seed % 2 == 1);
  }
}

TEST_P(GemmRandom, Backward) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 8; ++seed) {
    std::mt19937_64 rng(420000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_case(rng, rank, dtype);
    if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = gap_for(seed);
    const Inputs in(p, rng, gap);
    check_backward(p, in, gap, rng);
  }
}

TEST_P(GemmRandom, UnfusedOperations) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 6; ++seed) {
    std::mt19937_64 rng(430000 + 1000 * rank + 100 * int(dtype) + seed);
    const Problem p = random_case(rng, rank, dtype);
    if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + p.to_string());
    const int64_t gap = gap_for(seed);
    const Inputs in(p, rng, gap);
    check_unfused(p, in, gap, rng);
  }
}

// Rows through several slabs: window slabs cut along each axis, additional tokens in
// slabs of their own, the softmax (and its backward) on the naive kernels.
TEST_P(GemmRandom, ManySlabs) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  const auto [rank, dtype] = GetParam();
  for (int seed = 0; seed < 6; ++seed) {
    std::mt19937_64 rng(440000 + 1000 * rank + 100 * int(dtype) + seed);
    Problem p = random_case(rng, rank, dtype);
    p.additional_tokens = seed % 3;
    if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
    const int cap = seed % 2 ? 3 : 1 + int(p.window_size()) / 2;
    SCOPED_TRACE("seed " + std::to_string(seed) + ", slab cap " + std::to_string(cap) + ": " + p.to_string());
    SlabCap limit(cap);
    const int64_t gap = gap_for(seed);
    const Inputs in(p, rng, gap);
    check_forward(p, in, gap);
    check_backward(p, in, gap, rng);
    check_unfused(p, in, gap, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(RanksAndDtypes, GemmRandom,
                         ::testing::Combine(::testing::Values(1, 2, 3), ::testing::ValuesIn(kDtypes)),
                         [](const auto& info) {
                           return "rank" + std::to_string(std::get<0>(info.param)) + "_" +
                                  dtype_label(std::get<1>(info.param));
                         });

// ---- hand-picked problems

std::vector<Problem> handpicked(DType dtype) {
  std::vector<Problem> v;
  // Windows of ~10^3 slots: several slabs at any dtype, cut along every axis.
  v.push_back(make_problem(1, {700, 0, 0}, {601, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 64, 64, 2, true, dtype));
  v.push_back(make_problem(1, {900, 0, 0}, {700, 0, 0}, {1, 1, 1}, {3, 1, 1}, {true, false, false}, 1, 2, 1, 32, 32, 0,
                           false, dtype));
  v.push_back(make_problem(2, {40, 36, 0}, {31, 29, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 32, 32, 1, true, dtype));
  v.push_back(make_problem(3, {10, 12, 14}, {7, 9, 11}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 16, 16, 3, false, dtype));
  v.push_back(make_problem(3, {12, 16, 16}, {6, 8, 8}, {1, 2, 1}, {1, 1, 2}, {true, false, false}, 1, 1, 1, 32, 32, 0,
                           true, dtype));
  // NAT-like: 7x7 windows over several full tiles, batch and heads.
  v.push_back(make_problem(2, {70, 66, 0}, {7, 7, 0}, {1, 1, 1}, {1, 1, 1}, {}, 2, 2, 2, 32, 32, 0, true, dtype));
  v.push_back(make_problem(2, {56, 56, 0}, {7, 7, 0}, {4, 4, 1}, {1, 1, 1}, {}, 1, 2, 2, 32, 32, 0, false, dtype));
  // Head dims at the edges: 256 (PN keeps 256 in shared memory; float32 needs the
  // opt-in maximum), 200, 1.
  v.push_back(make_problem(1, {50, 0, 0}, {9, 0, 0}, {3, 1, 1}, {2, 1, 1}, {}, 1, 2, 1, 256, 8, 2, true, dtype));
  v.push_back(make_problem(1, {31, 0, 0}, {5, 0, 0}, {1, 1, 1}, {5, 1, 1}, {true, false, false}, 1, 1, 1, 200, 256, 0,
                           false, dtype));
  v.push_back(make_problem(1, {10, 0, 0}, {3, 0, 0}, {1, 1, 1}, {1, 1, 1}, {true, false, false}, 1, 1, 1, 1, 1, 1, true,
                           dtype));
  // The naive tests' problems: GQA, Dv != D, per-axis causal, extras, rpb.
  v.push_back(make_problem(2, {23, 19, 0}, {7, 5, 0}, {2, 1, 1}, {1, 2, 1}, {false, true, false}, 2, 4, 2, 32, 16, 3,
                           true, dtype));
  v.push_back(make_problem(3, {5, 7, 9}, {3, 3, 5}, {1, 2, 1}, {1, 3, 2}, {true, false, false}, 1, 3, 1, 16, 24, 1,
                           true, dtype));
  v.push_back(make_problem(2, {40, 33, 0}, {7, 9, 0}, {2, 3, 1}, {1, 1, 1}, {}, 2, 4, 2, 32, 32, 2, true, dtype));
  // Small dilation groups, run unfolded (core/unfold.hpp): two parts
  // (groups of 4 and 3), one part with rpb and additional tokens, an unfolded axis 1
  // (rank 3), unequal groups with rpb (one part forward, as it is backward).
  v.push_back(make_problem(1, {2048, 0, 0}, {3, 0, 0}, {520, 1, 1}, {1, 1, 1}, {}, 2, 2, 1, 32, 32, 0, false, dtype));
  v.push_back(make_problem(1, {300, 0, 0}, {5, 0, 0}, {20, 1, 1}, {2, 1, 1}, {true, false, false}, 1, 2, 1, 64, 64, 2,
                           true, dtype));
  v.push_back(make_problem(2, {6, 36, 0}, {5, 3, 0}, {1, 9, 1}, {1, 1, 1}, {}, 1, 2, 2, 32, 32, 0, true, dtype));
  v.push_back(make_problem(2, {37, 12, 0}, {3, 3, 0}, {10, 2, 1}, {1, 3, 1}, {true, false, false}, 1, 4, 2, 32, 32, 0,
                           true, dtype));
  // Full attention, blocked attention.
  v.push_back(make_problem(1, {64, 0, 0}, {64, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 2, 2, 8, 8, 0, false, dtype));
  v.push_back(make_problem(2, {12, 12, 0}, {4, 4, 0}, {1, 1, 1}, {4, 4, 1}, {}, 1, 2, 1, 8, 8, 0, true, dtype));
  // Periodic axes. Key boxes (PN, NN) and query boxes (IN) past both ends of a group:
  // unequal dilation groups, stride, GQA, extras, rpb; a window as long as its group
  // (every key once, through the seam); windows of ~10^3 slots (several slabs); beside
  // causal and plain axes; every axis of a 3-D torus; short groups (run unfolded); a
  // key box longer than its group (a 64-query tile over a group of 13).
  v.push_back(with_periodic(
      make_problem(1, {50, 0, 0}, {9, 0, 0}, {3, 1, 1}, {2, 1, 1}, {}, 2, 4, 2, 32, 32, 2, true, dtype),
      {true, false, false}));
  v.push_back(with_periodic(
      make_problem(1, {40, 0, 0}, {20, 0, 0}, {2, 1, 1}, {1, 1, 1}, {}, 1, 2, 1, 16, 16, 0, true, dtype),
      {true, false, false}));
  v.push_back(with_periodic(
      make_problem(1, {13, 0, 0}, {13, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 8, 8, 1, true, dtype),
      {true, false, false}));
  v.push_back(with_periodic(
      make_problem(1, {700, 0, 0}, {601, 0, 0}, {1, 1, 1}, {3, 1, 1}, {}, 1, 1, 1, 64, 64, 2, true, dtype),
      {true, false, false}));
  v.push_back(with_periodic(
      make_problem(2, {40, 33, 0}, {7, 9, 0}, {2, 3, 1}, {1, 2, 1}, {}, 2, 4, 2, 32, 32, 2, true, dtype),
      {true, true, false}));
  v.push_back(with_periodic(make_problem(2, {23, 19, 0}, {7, 5, 0}, {2, 1, 1}, {1, 2, 1}, {false, true, false}, 2, 4,
                                         2, 32, 16, 3, true, dtype),
                            {true, false, false}));
  v.push_back(with_periodic(
      make_problem(2, {40, 36, 0}, {31, 29, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 32, 32, 1, true, dtype),
      {false, true, false}));
  v.push_back(with_periodic(
      make_problem(3, {5, 7, 9}, {3, 3, 5}, {1, 2, 1}, {1, 3, 2}, {}, 1, 3, 1, 16, 24, 1, true, dtype),
      {true, true, true}));
  v.push_back(with_periodic(
      make_problem(3, {10, 12, 14}, {7, 9, 11}, {1, 1, 1}, {1, 1, 1}, {}, 1, 1, 1, 16, 16, 3, true, dtype),
      {true, false, true}));
  v.push_back(with_periodic(
      make_problem(2, {6, 36, 0}, {5, 3, 0}, {1, 9, 1}, {1, 1, 1}, {}, 1, 2, 2, 32, 32, 0, true, dtype),
      {true, true, false}));
  v.push_back(with_periodic(
      make_problem(1, {2048, 0, 0}, {3, 0, 0}, {520, 1, 1}, {1, 1, 1}, {}, 2, 2, 1, 32, 32, 0, false, dtype),
      {true, false, false}));
  v.push_back(with_periodic(
      make_problem(2, {12, 12, 0}, {4, 4, 0}, {1, 1, 1}, {4, 4, 1}, {}, 1, 2, 1, 8, 8, 0, true, dtype),
      {true, true, false}));
  return v;
}

class GemmHandpicked : public ::testing::TestWithParam<DType> {};

TEST_P(GemmHandpicked, ForwardBackwardUnfused) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  for (const Problem& p : handpicked(GetParam())) {
    if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
    SCOPED_TRACE(p.to_string());
    std::mt19937_64 rng(4243);
    const Inputs in(p, rng);
    check_forward(p, in, 0);
    check_forward(p, in, 0, /*rpb_float32=*/p.has_rpb);
    check_backward(p, in, 0, rng);
    check_unfused(p, in, 0, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GemmHandpicked, ::testing::ValuesIn(kDtypes),
                         [](const auto& info) { return dtype_label(info.param); });

// The last dimension of q, v and out with a stride other than 1: the element-wise
// paths with an inner stride.
TEST(GemmLayouts, TransposedHeadDims) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  int ran = 0;
  for (int variant = 0; variant < 2 * 3; ++variant) {
    const DType dtype = kDtypes[variant / 2];
    // Variant 1: periodic axes, whose key tiles past the seam load row by row.
    const Problem p = with_periodic(
        make_problem(2, {9, 7, 0}, {3, 5, 0}, {1, 1, 1}, {1, 2, 1}, {}, 2, 3, 3, 10, 6, 0, false, dtype),
        {variant % 2 == 1, variant % 2 == 1, false});
    if (!runs(p)) continue;
    ++ran;
    SCOPED_TRACE(p.to_string());
    std::mt19937_64 rng(7);
    const Inputs in(p, rng);
    HostTensor q_store(dtype, {2, 9, 7, 10, 3}), v_store(dtype, {2, 9, 7, 6, 3});
    HostTensor out_store = poisoned(dtype, {2, 9, 7, 6, 3}, 0);
    q_store.fill_random(rng);
    v_store.fill_random(rng);
    auto transposed = [](TensorRef t) {  // [.., a, b] -> [.., b, a] view
      std::swap(t.shape[t.ndim - 1], t.shape[t.ndim - 2]);
      std::swap(t.stride[t.ndim - 1], t.stride[t.ndim - 2]);
      return t;
    };
    DeviceTensor q(q_store), k(in.k), v(v_store), out(out_store);
    const Status s =
        forward(p, {transposed(q.ref()), k.ref(), transposed(v.ref()), {}, {}, {}, transposed(out.ref()), {}},
                options_for(Backend::kGemm));
    ASSERT_TRUE(s.ok()) << s.message();
    out.copy_to(out_store);
    const HostTensor got = convert(transposed(out_store.ref()), DType::kFloat64);
    const HostTensor q64 = convert(transposed(q_store.ref()), DType::kFloat64),
                     k64 = convert(in.k.ref(), DType::kFloat64),
                     v64 = convert(transposed(v_store.ref()), DType::kFloat64);
    HostTensor exact(DType::kFloat64, shape_of(got.ref()));
    ASSERT_TRUE(
        cpu::reference_forward(as_float64(p), {q64.ref(), k64.ref(), v64.ref(), {}, {}, {}, exact.ref(), {}}, false)
            .ok());
    const double tol = dtype == DType::kFloat32 ? 1e-6 : dtype == DType::kFloat16 ? 2e-3 : 1.6e-2;
    expect_match("out", got.values(), exact.values(), tol, tol);
  }
  if (ran == 0) GTEST_SKIP() << "this build has no gemm kernels for these problems' dtypes (NBHD_DTYPES)";
}

// The public qk produces the naive backend's attention weights (same layout, values
// within two roundings), and av reads them the same way. Seeds 9 and up make every
// non-causal axis periodic: slots in window order, through the seam.
TEST(GemmVsNaive, SameAttentionWeights) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  if (!built(Backend::kNaive)) GTEST_SKIP() << "the naive backend is not in this build";
  int ran = 0;
  for (DType dtype : kDtypes) {
    for (int seed = 0; seed < 15; ++seed) {
      std::mt19937_64 rng(450000 + 100 * int(dtype) + seed);
      Problem p = random_case(rng, 1 + seed % 3, dtype);
      if (seed >= 9)
        for (int a = 0; a < p.rank; ++a) p.periodic[a] = !p.causal[a];
      if (!runs(p)) continue;
      ++ran;
      SCOPED_TRACE(p.to_string());
      const Inputs in(p, rng);
      const auto attn_shape = with_last(shape_of(in.q.ref()), p.window_size() + p.additional_tokens);
      HostTensor mine = poisoned(dtype, attn_shape, 0), theirs = poisoned(dtype, attn_shape, 0);
      for (auto [backend, host] : {std::pair{Backend::kGemm, &mine}, std::pair{Backend::kNaive, &theirs}}) {
        DeviceTensor q(in.q), k(in.k), b(in.rpb), ak(in.ak), a(*host);
        const Status s = qk(p, {q.ref(), k.ref(), b.ref(), ak.ref(), a.ref()}, options_for(backend));
        ASSERT_TRUE(s.ok()) << name(backend) << ": " << s.message();
        a.copy_to(*host);
      }
      expect_match("qk, gemm vs naive", mine.values(), theirs.values(), 2 * two_ulps(dtype), 1e-5);
    }
  }
  if (ran == 0) GTEST_SKIP() << "this build has no gemm kernels for these problems' dtypes (NBHD_DTYPES)";
}


// Element offsets past 2^31 in each tensor the gemm kernels index: q, k, v, out (the
// forward) and also d out, dq, dk, dv (the backward) in turn are held with token rows
// 2^23 + 8 elements apart, so the rows of tokens >= 256 start beyond 2^31 elements
// (4.3 GB of float16); the other tensors stay packed. Written without a GPU (gemm has
// no CPU emulator): it first runs in scripts/gpu-check.
TEST(GemmLarge, OffsetsPast2Pow31Elements) {
  NBHD_REQUIRE_GPU();
  NBHD_REQUIRE_GEMM();
  constexpr int64_t L = 260, kTokenStride = (int64_t(1) << 23) + 8;
  // 2 query heads on 1 kv head (GQA), head dim 64.
  const Problem p =
      make_problem(1, {L, 0, 0}, {33, 0, 0}, {1, 1, 1}, {1, 1, 1}, {}, 1, 2, 1, 64, 0, 0, false, DType::kFloat16);
  if (!runs(p)) GTEST_SKIP() << "gemm does not run " << p.to_string() << " in this build (NBHD_DTYPES)";
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  const size_t big_bytes = size_t((L - 1) * kTokenStride + 128) * 2;  // one strided tensor at a time
  if (free_bytes < big_bytes + (size_t(1) << 30))
    GTEST_SKIP() << "needs " << (big_bytes >> 20) + 1024 << " MiB of free GPU memory, has " << (free_bytes >> 20);
  std::mt19937_64 rng(79);
  const Inputs in(p, rng);
  const auto q_shape = shape_of(in.q.ref());
  const Inputs64 in64(in, TensorRef{});

  // Forward: against float64 and the plain float16 computation (flash-attention rule).
  HostTensor exact(DType::kFloat64, q_shape), plain(p.dtype, q_shape);
  ASSERT_TRUE(cpu::reference_forward(as_float64(p), {in64.q.ref(), in64.k.ref(), in64.v.ref(), {}, {}, {}, exact.ref(), {}},
                                     false)
                  .ok());
  ASSERT_TRUE(
      cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), {}, {}, {}, plain.ref(), {}}, true).ok());
  const char* names[] = {"query", "key", "value", "out", "d out", "d query", "d key", "d value"};
  for (int strided = 0; strided < 4; ++strided) {
    SCOPED_TRACE(std::string("forward, ") + names[strided] + " strided");
    HostTensor out(p.dtype, q_shape);
    DeviceTensor q(in.q), k(in.k), v(in.v), o(out);
    const HostTensor* sources[] = {&in.q, &in.k, &in.v, &out};
    const testing::StridedDeviceTensor big(*sources[strided], kTokenStride);
    if (HasFailure()) return;
    TensorRef refs[] = {q.ref(), k.ref(), v.ref(), o.ref()};
    refs[strided] = big.ref();
    const Status s = forward(p, {refs[0], refs[1], refs[2], {}, {}, {}, refs[3], {}}, options_for(Backend::kGemm));
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (strided == 3) big.copy_to(out);
    else o.copy_to(out);
    testing::expect_close("out", p.dtype, out.values(), exact.values(), plain.values());
  }

  // Backward: out and lse from the reference, gradients against float64 (as check_backward).
  HostTensor out(p.dtype, q_shape), lse(DType::kFloat32, without_last(q_shape)), d_out(p.dtype, q_shape);
  d_out.fill_random(rng);
  ASSERT_TRUE(cpu::reference_forward(p, {in.q.ref(), in.k.ref(), in.v.ref(), {}, {}, {}, out.ref(), lse.ref()}, false).ok());
  const HostTensor d_out64 = convert(d_out.ref(), DType::kFloat64);
  HostTensor eq(DType::kFloat64, q_shape), ek(DType::kFloat64, shape_of(in.k.ref())),
      ev(DType::kFloat64, shape_of(in.v.ref()));
  BackwardTensors r;
  r.query = in64.q.ref();
  r.key = in64.k.ref();
  r.value = in64.v.ref();
  r.d_out = d_out64.ref();
  r.d_query = eq.ref();
  r.d_key = ek.ref();
  r.d_value = ev.ref();
  ASSERT_TRUE(cpu::reference_backward(as_float64(p), r).ok());
  for (int strided = 0; strided < 8; ++strided) {
    SCOPED_TRACE(std::string("backward, ") + names[strided] + " strided");
    HostTensor dq(p.dtype, q_shape), dk(p.dtype, shape_of(in.k.ref())), dv(p.dtype, shape_of(in.v.ref()));
    DeviceTensor q(in.q), k(in.k), v(in.v), o(out), l(lse), g(d_out), gq(dq), gk(dk), gv(dv);
    const HostTensor* sources[] = {&in.q, &in.k, &in.v, &out, &d_out, &dq, &dk, &dv};
    const testing::StridedDeviceTensor big(*sources[strided], kTokenStride);
    if (HasFailure()) return;
    TensorRef refs[] = {q.ref(), k.ref(), v.ref(), o.ref(), g.ref(), gq.ref(), gk.ref(), gv.ref()};
    refs[strided] = big.ref();
    BackwardTensors t;
    t.query = refs[0];
    t.key = refs[1];
    t.value = refs[2];
    t.out = refs[3];
    t.lse = l.ref();
    t.d_out = refs[4];
    t.d_query = refs[5];
    t.d_key = refs[6];
    t.d_value = refs[7];
    const Status s = backward(p, t, options_for(Backend::kGemm));
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    HostTensor* grads[] = {&dq, &dk, &dv};
    const DeviceTensor* packed[] = {&gq, &gk, &gv};
    for (int i = 0; i < 3; ++i) {
      if (strided == 5 + i) big.copy_to(*grads[i]);
      else packed[i]->copy_to(*grads[i]);
    }
    const double rtol = two_ulps(p.dtype), atol = gradient_atol(p.dtype);
    expect_match("d query", dq.values(), eq.values(), rtol, atol);
    expect_match("d key", dk.values(), ek.values(), rtol, atol);
    expect_match("d value", dv.values(), ev.values(), rtol, atol);
  }
}

}  // namespace
}  // namespace nbhd
