// SPDX-License-Identifier: Apache-2.0
// The `cpu` backend: tiles of queries (a box of one dilation group) share the box of
// keys their windows cover. Keys and values of that box are packed once per tile
// into contiguous arrays of the accumulation type, so the inner loops run over
// unit-stride memory and vectorise; tiles run on all cores.
//
// Forward: per query tile, scores -> softmax -> out.
// Backward: pass 1 over query tiles (delta = <dO, O>, dq, d rpb); pass 2 over key
// tiles, visiting the queries whose windows hold each key (the inverse
// neighborhood), for dk and dv; pass 3 for the additional tokens' gradients.
// Query tiles cover the problem's query sub-box, key tiles the whole grid; pass 2
// gathers from the sub-box's queries only.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/layout.hpp"
#include "cpu/box_layout.hpp"
#include "cpu/element.hpp"
#include "cpu/parallel.hpp"
#include "dispatch/backend.hpp"

namespace nbhd::cpu {
namespace {

using detail::RpbLayout;
using detail::TokenLayout;

// Tile extent per padded axis: 2x4x8 = 64 queries share one key box. Along the
// innermost axis the box is contiguous in the packed arrays.
constexpr int kTile[kMaxRank] = {2, 4, 8};

// Blocks of query tiles whose d rpb sums are kept apart (parallel_for_blocks): 128
// keeps 128 workers busy and costs 128 partial tables of H x (2k - 1)^rank doubles
// (3.3 MB at 16 heads and a 13x13 window).
constexpr int64_t kRpbBlocks = 128;

// A box of one dilation group: per axis the group and a range of group indices.
struct Box {
  int group[kMaxRank];
  Range r[kMaxRank];

  int64_t volume() const { return int64_t(r[0].size()) * r[1].size() * r[2].size(); }
  int64_t local(int j0, int j1, int j2) const {
    return (int64_t(j0 - r[0].begin) * r[1].size() + (j1 - r[1].begin)) * r[2].size() + (j2 - r[2].begin);
  }
};

// Group indices of dilation group g whose tokens lie in `tokens` (grid coordinates).
Range group_indices(const Axis& ax, int g, Range tokens) {
  return {ceil_div(std::max(tokens.begin - g, 0), ax.dilation), ceil_div(std::max(tokens.end - g, 0), ax.dilation)};
}

// Tiles of one axis over the tokens `tokens`: every (group, range of group indices)
// of at most `tile` indices.
std::vector<std::pair<int, Range>> axis_tiles(const Axis& ax, int tile, Range tokens) {
  std::vector<std::pair<int, Range>> tiles;
  for (int g = 0; g < ax.dilation; ++g) {
    const Range r = group_indices(ax, g, tokens);
    for (int j = r.begin; j < r.end; j += tile) tiles.push_back({g, {j, std::min(j + tile, r.end)}});
  }
  return tiles;
}

struct Tiling {
  std::vector<std::pair<int, Range>> axis[kMaxRank];
  int64_t per_head() const { return int64_t(axis[0].size()) * axis[1].size() * axis[2].size(); }
  Box box(int64_t i) const {
    Box b{};
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const auto& t = axis[a][i % int64_t(axis[a].size())];
      i /= int64_t(axis[a].size());
      b.group[a] = t.first;
      b.r[a] = t.second;
    }
    return b;
  }
};

// Tiles of the box `tokens` (per padded axis, grid coordinates).
Tiling make_tiling(const Neighborhood& nb, const Range* tokens) {
  Tiling t;
  for (int a = 0; a < kMaxRank; ++a) t.axis[a] = axis_tiles(nb.axis[a], kTile[a], tokens[a]);
  return t;
}

// Everything the passes share.
struct Ctx {
  const Problem& p;
  Neighborhood nb;
  double scale;
  int64_t D, Dv, M, group;
  BoxLayout q, k, v;  // q: the query sub-box's tokens; k, v: the grid's
  TokenLayout ak, av;
  RpbLayout rpb;
  const TensorRef *tq, *tk, *tv, *trpb, *tak, *tav;

  Ctx(const Problem& p_, const TensorRef& q_, const TensorRef& k_, const TensorRef& v_, const TensorRef& rpb_,
      const TensorRef& ak_, const TensorRef& av_)
      : p(p_), nb(p_.neighborhood()), scale(p_.softmax_scale()), D(p_.dim), Dv(p_.value_dim()),
        M(p_.additional_tokens), group(p_.heads_per_kv()), q(query_layout(q_, p_)), k(key_layout(k_, p_)),
        v(key_layout(v_, p_)), ak(detail::token_layout(ak_, 1)),
        av(detail::token_layout(av_, 1)), rpb(detail::rpb_layout(rpb_, p_.rank)), tq(&q_), tk(&k_), tv(&v_),
        trpb(&rpb_), tak(&ak_), tav(&av_) {}
};

// The token of group indices j in the dilation groups `group`; on a periodic axis j
// is unwrapped (a box may reach past either end of the group) and wraps.
void token_of(const Neighborhood& nb, const int* group, const int* j, int* token) {
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = nb.axis[a];
    token[a] = group[a] + ax.dilation * (ax.periodic ? ax.wrap(j[a], ax.group_length(group[a])) : j[a]);
  }
}

// Rows of the tokens of `box` (zeros for tokens the tensor does not hold: queries
// outside the query sub-box).
template <class Acc>
void pack_box(const Ctx& c, const TensorRef& t, const BoxLayout& l, int64_t b, int64_t h, int64_t n, const Box& box,
              Acc* rows, Acc* transposed) {
  const int64_t vol = box.volume();
  std::vector<Acc> one_row(rows ? 0 : n);
  int64_t i = 0;
  for (int j0 = box.r[0].begin; j0 < box.r[0].end; ++j0)
    for (int j1 = box.r[1].begin; j1 < box.r[1].end; ++j1)
      for (int j2 = box.r[2].begin; j2 < box.r[2].end; ++j2, ++i) {
        const int j[kMaxRank] = {j0, j1, j2};
        int token[kMaxRank];
        token_of(c.nb, box.group, j, token);
        Acc* row = rows ? rows + i * n : one_row.data();
        if (l.holds(token))
          load_row(t, l.offset(b, token, h), l.inner, n, row);
        else
          std::fill(row, row + n, Acc(0));
        if (transposed)
          for (int64_t d = 0; d < n; ++d) transposed[d * vol + i] = row[d];
      }
}

template <class Acc>
void pack_additional(const Ctx& c, const TensorRef& t, const TokenLayout& l, int64_t b, int64_t h, int64_t n,
                     Acc* rows) {
  for (int64_t m = 0; m < c.M; ++m) {
    const int token[kMaxRank] = {0, 0, int(m)};
    load_row(t, l.offset(b, token, h), l.inner, n, rows + m * n);
  }
}

template <class Acc>
Acc dot(const Acc* a, const Acc* b, int64_t n) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// scores[i] (for the window of one query, in slot order) = <qs, key> over the keys of
// `win` (group index ranges) packed transposed in kt with box `kbox`.
template <class Acc>
void window_dots(const Acc* qs, const Acc* kt, const Box& kbox, const Range* win, int64_t n, Acc* scores) {
  const int64_t vol = kbox.volume(), run = win[2].size();
  int64_t out = 0;
  for (int j0 = win[0].begin; j0 < win[0].end; ++j0)
    for (int j1 = win[1].begin; j1 < win[1].end; ++j1, out += run) {
      Acc* s = scores + out;
      for (int64_t j = 0; j < run; ++j) s[j] = 0;
      const int64_t base = kbox.local(j0, j1, win[2].begin);
      for (int64_t d = 0; d < n; ++d) {
        const Acc qd = qs[d];
        const Acc* col = kt + d * vol + base;
#pragma omp simd
        for (int64_t j = 0; j < run; ++j) s[j] += qd * col[j];
      }
    }
}

// Adds rpb[h, key - query + k - 1] to the window's scores (slot order).
template <class Acc>
void add_rpb(const Ctx& c, int64_t h, const int* jq, const Range* win, Acc* scores) {
  int64_t i = 0;
  int idx[kMaxRank];
  for (int j0 = win[0].begin; j0 < win[0].end; ++j0)
    for (int j1 = win[1].begin; j1 < win[1].end; ++j1)
      for (int j2 = win[2].begin; j2 < win[2].end; ++j2, ++i) {
        const int j[kMaxRank] = {j0, j1, j2};
        for (int a = 0; a < kMaxRank; ++a) idx[a] = j[a] - jq[a] + c.nb.axis[a].kernel - 1;
        scores[i] += Acc(load(*c.trpb, c.rpb.offset(h, idx)));
      }
}

// out[d] += w * rows[local(key)][d] over the window's keys.
template <class Acc>
void window_axpy(const Acc* weights, const Acc* rows, const Box& kbox, const Range* win, int64_t n, Acc* out) {
  int64_t i = 0;
  for (int j0 = win[0].begin; j0 < win[0].end; ++j0)
    for (int j1 = win[1].begin; j1 < win[1].end; ++j1)
      for (int j2 = win[2].begin; j2 < win[2].end; ++j2, ++i) {
        const Acc w = weights[i];
        const Acc* row = rows + kbox.local(j0, j1, j2) * n;
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) out[d] += w * row[d];
      }
}

struct QueryWindows {
  Range win[kMaxRank];
  int64_t size;
};

QueryWindows windows_in_group(const Ctx& c, const Box& qbox, const int* j) {
  QueryWindows w;
  w.size = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = c.nb.axis[a];
    w.win[a] = ax.window(j[a], ax.group_length(qbox.group[a]));
    w.size *= w.win[a].size();
  }
  return w;
}

Box key_box(const Ctx& c, const Box& qbox) {
  Box kb = qbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = c.nb.axis[a];
    kb.r[a] = ax.window_union(qbox.r[a], ax.group_length(qbox.group[a]));
  }
  return kb;
}

// The queries of `r` (group indices of group g on axis a) that the query sub-box
// holds. A periodic axis's range is unwrapped and stays whole: there pack_box gives
// the queries outside the sub-box zero rows, and pass 2 gives them probability 0.
Range computed_queries(const Ctx& c, int a, int g, Range r) {
  const Axis& ax = c.nb.axis[a];
  if (ax.periodic) return r;
  const Range box = group_indices(ax, g, c.q.box[a]);
  const int begin = std::max(r.begin, box.begin);
  return {begin, std::max(begin, std::min(r.end, box.end))};
}

// The computed queries of a key tile: the union of its keys' inverse windows (on a
// periodic axis unwrapped next to the keys, so the box may reach past either end of
// the group and its tokens wrap in pack_box).
Box queries_of(const Ctx& c, const Box& kbox) {
  Box qb = kbox;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = c.nb.axis[a];
    qb.r[a] = computed_queries(c, a, kbox.group[a], ax.inverse_window_union(kbox.r[a], ax.group_length(kbox.group[a])));
  }
  return qb;
}

// Softmax of `n` scores in place into probabilities; returns the log of the sum.
template <class Acc>
Acc softmax_in_place(Acc* s, int64_t n) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  Acc sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  const Acc inv = Acc(1) / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
  return mx + std::log(sum);
}

template <class Acc>
Status forward_impl(const Problem& p, const ForwardTensors& t, const Options& o) {
  const Ctx c(p, t.query, t.key, t.value, t.rpb, t.additional_keys, t.additional_values);
  const BoxLayout ol = query_layout(t.out, p), ll = query_layout(t.lse, p, false);
  const Tiling tiling = make_tiling(c.nb, c.q.box);
  const int64_t tiles = tiling.per_head(), kv_heads = p.kv_heads, W = p.window_size();
  const int workers = resolve_threads(o.num_threads);

  struct Scratch {
    std::vector<Acc> kt, v, ak, av, qs, scores, out;
  };
  std::vector<Scratch> scratch(workers);
  parallel_for(p.batch * kv_heads * tiles, workers, [&](int64_t i, int worker) {
    Scratch& s = scratch[worker];
    const int64_t b = i / (kv_heads * tiles), hk = i / tiles % kv_heads;
    const Box qbox = tiling.box(i % tiles), kbox = key_box(c, qbox);
    const int64_t vol = kbox.volume();
    s.kt.resize(vol * c.D);
    s.v.resize(vol * c.Dv);
    s.ak.resize(c.M * c.D);
    s.av.resize(c.M * c.Dv);
    s.qs.resize(c.D);
    s.scores.resize(W + c.M);
    s.out.resize(c.Dv);
    pack_box<Acc>(c, t.key, c.k, b, hk, c.D, kbox, nullptr, s.kt.data());
    pack_box<Acc>(c, t.value, c.v, b, hk, c.Dv, kbox, s.v.data(), nullptr);
    pack_additional(c, t.additional_keys, c.ak, b, hk, c.D, s.ak.data());
    pack_additional(c, t.additional_values, c.av, b, hk, c.Dv, s.av.data());
    for (int j0 = qbox.r[0].begin; j0 < qbox.r[0].end; ++j0)
      for (int j1 = qbox.r[1].begin; j1 < qbox.r[1].end; ++j1)
        for (int j2 = qbox.r[2].begin; j2 < qbox.r[2].end; ++j2) {
          const int j[kMaxRank] = {j0, j1, j2};
          int token[kMaxRank];
          token_of(c.nb, qbox.group, j, token);
          const QueryWindows w = windows_in_group(c, qbox, j);
          for (int64_t h = hk * c.group; h < (hk + 1) * c.group; ++h) {
            load_row(t.query, c.q.offset(b, token, h), c.q.inner, c.D, s.qs.data());
            for (int64_t d = 0; d < c.D; ++d) s.qs[d] *= Acc(c.scale);
            Acc* scores = s.scores.data();
            window_dots(s.qs.data(), s.kt.data(), kbox, w.win, c.D, scores);
            if (t.rpb.defined()) add_rpb(c, h, j, w.win, scores);
            for (int64_t m = 0; m < c.M; ++m) scores[w.size + m] = dot(s.qs.data(), &s.ak[m * c.D], c.D);
            const Acc lse = softmax_in_place(scores, w.size + c.M);
            std::fill(s.out.begin(), s.out.end(), Acc(0));
            window_axpy(scores, s.v.data(), kbox, w.win, c.Dv, s.out.data());
            for (int64_t m = 0; m < c.M; ++m)
              for (int64_t d = 0; d < c.Dv; ++d) s.out[d] += scores[w.size + m] * s.av[m * c.Dv + d];
            store_row(t.out, ol.offset(b, token, h), ol.inner, c.Dv, s.out.data());
            if (t.lse.defined()) store(t.lse, ll.offset(b, token, h), double(lse));
          }
        }
  });
  return Status::Ok();
}

template <class Acc>
Status backward_impl(const Problem& p, const BackwardTensors& t, const Options& o) {
  const Ctx c(p, t.query, t.key, t.value, t.rpb, t.additional_keys, t.additional_values);
  const BoxLayout ol = query_layout(t.out, p), gl = query_layout(t.d_out, p), ll = query_layout(t.lse, p, false);
  const BoxLayout dll = query_layout(t.d_lse, p, false);
  const BoxLayout dql = query_layout(t.d_query, p), dkl = key_layout(t.d_key, p), dvl = key_layout(t.d_value, p);
  const Tiling tiling = make_tiling(c.nb, c.q.box), key_tiling = make_tiling(c.nb, c.k.box);
  const int64_t tiles = tiling.per_head(), key_tiles = key_tiling.per_head(), kv_heads = p.kv_heads,
                W = p.window_size(), H = p.heads;
  const int workers = resolve_threads(o.num_threads);
  const int e1 = p.padded_extent(1), e2 = p.padded_extent(2);
  const int64_t N = p.tokens();
  auto flat = [&](int64_t b, const int* x, int64_t h) { return ((b * N + (int64_t(x[0]) * e1 + x[1]) * e2 + x[2]) * H + h); };

  // delta[b, token, h] = <dO, O>, written by pass 1 (for the query sub-box) and read by
  // passes 2 and 3.
  std::vector<Acc> delta(p.batch * N * H);
  const int64_t rpb_size = p.has_rpb ? H * p.rpb_size() : 0;
  // d rpb: partial sums per block of query tiles (parallel_for_blocks), so that the
  // gradient has the same bits on every run and thread count (per worker it did not:
  // torch.equal failed on a 16-core machine).
  const int64_t query_items = p.batch * kv_heads * tiles;
  const int64_t rpb_blocks = std::min<int64_t>(query_items, kRpbBlocks);
  std::vector<std::vector<Acc>> d_rpb(rpb_blocks, std::vector<Acc>(t.d_rpb.defined() ? rpb_size : 0));
  const int r0 = 2 * c.nb.axis[0].kernel - 1, r1 = 2 * c.nb.axis[1].kernel - 1, r2 = 2 * c.nb.axis[2].kernel - 1;

  // Pass 1: query tiles.
  {
    struct Scratch {
      std::vector<Acc> k, kt, v, vt, ak, av, qs, dO, scores, dp, dq;
    };
    std::vector<Scratch> scratch(workers);
    parallel_for_blocks(query_items, rpb_blocks, workers, [&](int64_t i, int worker, int64_t block) {
      Scratch& s = scratch[worker];
      const int64_t b = i / (kv_heads * tiles), hk = i / tiles % kv_heads;
      const Box qbox = tiling.box(i % tiles), kbox = key_box(c, qbox);
      const int64_t vol = kbox.volume();
      s.k.resize(vol * c.D);
      s.kt.resize(vol * c.D);
      s.v.resize(vol * c.Dv);
      s.vt.resize(vol * c.Dv);
      s.ak.resize(c.M * c.D);
      s.av.resize(c.M * c.Dv);
      s.qs.resize(c.D);
      s.dO.resize(c.Dv);
      s.scores.resize(W + c.M);
      s.dp.resize(W + c.M);
      s.dq.resize(c.D);
      pack_box(c, t.key, c.k, b, hk, c.D, kbox, s.k.data(), s.kt.data());
      pack_box(c, t.value, c.v, b, hk, c.Dv, kbox, s.v.data(), s.vt.data());
      pack_additional(c, t.additional_keys, c.ak, b, hk, c.D, s.ak.data());
      pack_additional(c, t.additional_values, c.av, b, hk, c.Dv, s.av.data());
      for (int j0 = qbox.r[0].begin; j0 < qbox.r[0].end; ++j0)
        for (int j1 = qbox.r[1].begin; j1 < qbox.r[1].end; ++j1)
          for (int j2 = qbox.r[2].begin; j2 < qbox.r[2].end; ++j2) {
            const int j[kMaxRank] = {j0, j1, j2};
            int token[kMaxRank];
            token_of(c.nb, qbox.group, j, token);
            const QueryWindows w = windows_in_group(c, qbox, j);
            const int64_t n = w.size + c.M;
            for (int64_t h = hk * c.group; h < (hk + 1) * c.group; ++h) {
              load_row(t.query, c.q.offset(b, token, h), c.q.inner, c.D, s.qs.data());
              for (int64_t d = 0; d < c.D; ++d) s.qs[d] *= Acc(c.scale);
              load_row(t.d_out, gl.offset(b, token, h), gl.inner, c.Dv, s.dO.data());
              Acc dlt = 0;
              for (int64_t d = 0; d < c.Dv; ++d) dlt += s.dO[d] * Acc(load(t.out, ol.offset(b, token, h) + d * ol.inner));
              if (t.d_lse.defined()) dlt -= Acc(load(t.d_lse, dll.offset(b, token, h)));  // BackwardTensors::d_lse
              delta[flat(b, token, h)] = dlt;
              const Acc lse = Acc(load(t.lse, ll.offset(b, token, h)));

              Acc* sc = s.scores.data();
              Acc* dp = s.dp.data();
              window_dots(s.qs.data(), s.kt.data(), kbox, w.win, c.D, sc);
              if (t.rpb.defined()) add_rpb(c, h, j, w.win, sc);
              window_dots(s.dO.data(), s.vt.data(), kbox, w.win, c.Dv, dp);
              for (int64_t m = 0; m < c.M; ++m) {
                sc[w.size + m] = dot(s.qs.data(), &s.ak[m * c.D], c.D);
                dp[w.size + m] = dot(s.dO.data(), &s.av[m * c.Dv], c.Dv);
              }
              // sc <- dS = P * (dP - delta), P = exp(score - lse).
              for (int64_t x = 0; x < n; ++x) sc[x] = std::exp(sc[x] - lse) * (dp[x] - dlt);
              std::fill(s.dq.begin(), s.dq.end(), Acc(0));
              window_axpy(sc, s.k.data(), kbox, w.win, c.D, s.dq.data());
              for (int64_t m = 0; m < c.M; ++m)
                for (int64_t d = 0; d < c.D; ++d) s.dq[d] += sc[w.size + m] * s.ak[m * c.D + d];
              for (int64_t d = 0; d < c.D; ++d) s.dq[d] *= Acc(c.scale);
              store_row(t.d_query, dql.offset(b, token, h), dql.inner, c.D, s.dq.data());
              if (t.d_rpb.defined()) {
                Acc* acc = d_rpb[block].data() + h * r0 * r1 * r2;
                int64_t x = 0;
                for (int k0 = w.win[0].begin; k0 < w.win[0].end; ++k0)
                  for (int k1 = w.win[1].begin; k1 < w.win[1].end; ++k1)
                    for (int k2 = w.win[2].begin; k2 < w.win[2].end; ++k2, ++x) {
                      const int i0 = k0 - j0 + c.nb.axis[0].kernel - 1, i1 = k1 - j1 + c.nb.axis[1].kernel - 1,
                                i2 = k2 - j2 + c.nb.axis[2].kernel - 1;
                      acc[(int64_t(i0) * r1 + i1) * r2 + i2] += sc[x];
                    }
              }
            }
          }
    });
  }

  // Pass 2: key tiles; each key gathers from the queries whose windows hold it.
  {
    struct Scratch {
      std::vector<Acc> q, qt, dO, dOt, lse, delta, kk, vv, sc, dp, dk, dv;
    };
    std::vector<Scratch> scratch(workers);
    parallel_for(p.batch * kv_heads * key_tiles, workers, [&](int64_t i, int worker) {
      Scratch& s = scratch[worker];
      const int64_t b = i / (kv_heads * key_tiles), hk = i / key_tiles % kv_heads;
      const Box kbox = key_tiling.box(i % key_tiles), qbox = queries_of(c, kbox);
      const int64_t vol = qbox.volume(), G = c.group;
      s.q.resize(G * vol * c.D);
      s.qt.resize(G * vol * c.D);
      s.dO.resize(G * vol * c.Dv);
      s.dOt.resize(G * vol * c.Dv);
      s.lse.resize(G * vol);
      s.delta.resize(G * vol);
      s.kk.resize(c.D);
      s.vv.resize(c.Dv);
      s.sc.resize(vol);
      s.dp.resize(vol);
      s.dk.resize(c.D);
      s.dv.resize(c.Dv);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        pack_box(c, t.query, c.q, b, h, c.D, qbox, s.q.data() + g * vol * c.D, s.qt.data() + g * vol * c.D);
        pack_box(c, t.d_out, gl, b, h, c.Dv, qbox, s.dO.data() + g * vol * c.Dv, s.dOt.data() + g * vol * c.Dv);
        int64_t x = 0;
        for (int j0 = qbox.r[0].begin; j0 < qbox.r[0].end; ++j0)
          for (int j1 = qbox.r[1].begin; j1 < qbox.r[1].end; ++j1)
            for (int j2 = qbox.r[2].begin; j2 < qbox.r[2].end; ++j2, ++x) {
              const int j[kMaxRank] = {j0, j1, j2};
              int token[kMaxRank];
              token_of(c.nb, qbox.group, j, token);
              // A query outside the sub-box (periodic axes, see computed_queries) has
              // zero q and dO rows; lse +inf makes its probability exactly 0 as well
              // (its score is the bias alone, whose exp need not be finite).
              const bool computed = c.q.holds(token);
              s.lse[g * vol + x] =
                  computed ? Acc(load(t.lse, ll.offset(b, token, h))) : std::numeric_limits<Acc>::infinity();
              s.delta[g * vol + x] = computed ? delta[flat(b, token, h)] : Acc(0);
            }
      }
      for (int k0 = kbox.r[0].begin; k0 < kbox.r[0].end; ++k0)
        for (int k1 = kbox.r[1].begin; k1 < kbox.r[1].end; ++k1)
          for (int k2 = kbox.r[2].begin; k2 < kbox.r[2].end; ++k2) {
            const int jk[kMaxRank] = {k0, k1, k2};
            int token[kMaxRank];
            token_of(c.nb, kbox.group, jk, token);
            Range inv[kMaxRank];
            bool seen = true;  // by a query of the sub-box
            for (int a = 0; a < kMaxRank; ++a) {
              const Axis& ax = c.nb.axis[a];
              inv[a] = computed_queries(c, a, kbox.group[a], ax.inverse_window(jk[a], ax.group_length(kbox.group[a])));
              seen = seen && inv[a].size() > 0;
            }
            load_row(t.key, c.k.offset(b, token, hk), c.k.inner, c.D, s.kk.data());
            for (int64_t d = 0; d < c.D; ++d) s.kk[d] *= Acc(c.scale);
            load_row(t.value, c.v.offset(b, token, hk), c.v.inner, c.Dv, s.vv.data());
            std::fill(s.dk.begin(), s.dk.end(), Acc(0));
            std::fill(s.dv.begin(), s.dv.end(), Acc(0));
            for (int64_t g = 0; g < G && seen; ++g) {
              const int64_t h = hk * G + g;
              window_dots(s.kk.data(), &s.qt[g * vol * c.D], qbox, inv, c.D, s.sc.data());
              window_dots(s.vv.data(), &s.dOt[g * vol * c.Dv], qbox, inv, c.Dv, s.dp.data());
              int64_t x = 0;
              for (int q0 = inv[0].begin; q0 < inv[0].end; ++q0)
                for (int q1 = inv[1].begin; q1 < inv[1].end; ++q1)
                  for (int q2 = inv[2].begin; q2 < inv[2].end; ++q2, ++x) {
                    const int64_t l = g * vol + qbox.local(q0, q1, q2);
                    Acc score = s.sc[x];
                    if (t.rpb.defined()) {
                      const int idx[kMaxRank] = {k0 - q0 + c.nb.axis[0].kernel - 1, k1 - q1 + c.nb.axis[1].kernel - 1,
                                                 k2 - q2 + c.nb.axis[2].kernel - 1};
                      score += Acc(load(t.rpb, c.rpb.offset(h, idx)));
                    }
                    const Acc prob = std::exp(score - s.lse[l]);
                    s.sc[x] = prob * (s.dp[x] - s.delta[l]);  // dS
                    s.dp[x] = prob;
                  }
              window_axpy(s.sc.data(), &s.q[g * vol * c.D], qbox, inv, c.D, s.dk.data());
              window_axpy(s.dp.data(), &s.dO[g * vol * c.Dv], qbox, inv, c.Dv, s.dv.data());
            }
            for (int64_t d = 0; d < c.D; ++d) s.dk[d] *= Acc(c.scale);
            store_row(t.d_key, dkl.offset(b, token, hk), dkl.inner, c.D, s.dk.data());
            store_row(t.d_value, dvl.offset(b, token, hk), dvl.inner, c.Dv, s.dv.data());
          }
    });
  }

  // Pass 3: gradients of the additional tokens, which every query of the batch sees.
  if (c.M > 0) {
    const TokenLayout dakl = detail::token_layout(t.d_additional_keys, 1),
                      davl = detail::token_layout(t.d_additional_values, 1);
    struct Scratch {
      std::vector<Acc> ak, av, q, dO, dk, dv;
    };
    std::vector<Scratch> scratch(workers);
    parallel_for(p.batch * kv_heads * c.M, workers, [&](int64_t i, int worker) {
      Scratch& s = scratch[worker];
      const int64_t b = i / (kv_heads * c.M), hk = i / c.M % kv_heads, m = i % c.M;
      const int mt[kMaxRank] = {0, 0, int(m)};
      s.ak.resize(c.D);
      s.av.resize(c.Dv);
      s.q.resize(c.D);
      s.dO.resize(c.Dv);
      s.dk.assign(c.D, Acc(0));
      s.dv.assign(c.Dv, Acc(0));
      load_row(t.additional_keys, c.ak.offset(b, mt, hk), c.ak.inner, c.D, s.ak.data());
      load_row(t.additional_values, c.av.offset(b, mt, hk), c.av.inner, c.Dv, s.av.data());
      const Range* box = c.q.box;
      for (int x0 = box[0].begin; x0 < box[0].end; ++x0)
        for (int x1 = box[1].begin; x1 < box[1].end; ++x1)
          for (int x2 = box[2].begin; x2 < box[2].end; ++x2) {
            const int token[kMaxRank] = {x0, x1, x2};
            for (int64_t h = hk * c.group; h < (hk + 1) * c.group; ++h) {
              load_row(t.query, c.q.offset(b, token, h), c.q.inner, c.D, s.q.data());
              load_row(t.d_out, gl.offset(b, token, h), gl.inner, c.Dv, s.dO.data());
              const Acc prob = std::exp(Acc(c.scale) * dot(s.q.data(), s.ak.data(), c.D) -
                                        Acc(load(t.lse, ll.offset(b, token, h))));
              const Acc ds = prob * (dot(s.dO.data(), s.av.data(), c.Dv) - delta[flat(b, token, h)]);
              for (int64_t d = 0; d < c.D; ++d) s.dk[d] += Acc(c.scale) * ds * s.q[d];
              for (int64_t d = 0; d < c.Dv; ++d) s.dv[d] += prob * s.dO[d];
            }
          }
      if (t.d_additional_keys.defined()) store_row(t.d_additional_keys, dakl.offset(b, mt, hk), dakl.inner, c.D, s.dk.data());
      if (t.d_additional_values.defined())
        store_row(t.d_additional_values, davl.offset(b, mt, hk), davl.inner, c.Dv, s.dv.data());
    });
  }

  if (t.d_rpb.defined()) {
    const RpbLayout out = detail::rpb_layout(t.d_rpb, p.rank);
    for (int64_t h = 0; h < H; ++h)
      for (int i0 = 0; i0 < r0; ++i0)
        for (int i1 = 0; i1 < r1; ++i1)
          for (int i2 = 0; i2 < r2; ++i2) {
            double sum = 0;
            for (const auto& part : d_rpb) sum += part[((h * r0 + i0) * r1 + i1) * r2 + i2];
            const int idx[kMaxRank] = {i0, i1, i2};
            store(t.d_rpb, out.offset(h, idx), sum);
          }
  }
  return Status::Ok();
}

}  // namespace
}  // namespace nbhd::cpu

namespace nbhd::detail {
namespace {

Status cpu_supports(const Problem&, Pass pass) {
  if (pass == Pass::kUnfused) return unsupported("the unfused operations run on the reference backend on the CPU");
  return Status::Ok();
}

// float64 problems accumulate in float64; the others (float32, float16, bfloat16) in float32.
Status cpu_forward(const Problem& p, const ForwardTensors& t, const Options& o) {
  return p.dtype == DType::kFloat64 ? cpu::forward_impl<double>(p, t, o) : cpu::forward_impl<float>(p, t, o);
}

Status cpu_backward(const Problem& p, const BackwardTensors& t, const Options& o) {
  return p.dtype == DType::kFloat64 ? cpu::backward_impl<double>(p, t, o) : cpu::backward_impl<float>(p, t, o);
}

}  // namespace

extern const BackendImpl kCpuBackend = {Backend::kCpu, Device::kCPU,      cpu_supports,
                                        cpu_forward,   cpu_backward,      nullptr,
                                        /*unfolds_short_groups=*/false, /*runs_periodic=*/true};

}  // namespace nbhd::detail
