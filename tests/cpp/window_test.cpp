// SPDX-License-Identifier: Apache-2.0
// The neighborhood definition against the spec, exhaustively on small axes, and
// against hand-worked cases (even kernels, strides, unequal dilation groups).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "nbhd/core/window.hpp"
#include "nbhd/problem.hpp"
#include "spec_oracle.hpp"

namespace nbhd {
namespace {

using testing::SpecAxis;
using testing::spec_axis_neighbors;

// Keys of query i according to window.hpp, as axis indices, in window order.
std::vector<int> window_keys(const Axis& ax, int i) {
  const int g = i % ax.dilation, lg = ax.group_length(g);
  const Range w = ax.window(i / ax.dilation, lg);
  std::vector<int> keys;
  for (int j = w.begin; j < w.end; ++j) keys.push_back(g + ax.dilation * ax.wrap(j, lg));
  return keys;
}

// The same, ascending.
std::vector<int> library_neighbors(const Axis& ax, int i) {
  std::vector<int> keys = window_keys(ax, i);
  std::sort(keys.begin(), keys.end());
  return keys;
}

SpecAxis spec_of(const Axis& ax) {
  return SpecAxis{ax.length, ax.kernel, ax.dilation, ax.stride, ax.causal, ax.periodic};
}

std::string describe(const Axis& ax) {
  return "L=" + std::to_string(ax.length) + " k=" + std::to_string(ax.kernel) + " d=" + std::to_string(ax.dilation) +
         " s=" + std::to_string(ax.stride) + " causal=" + std::to_string(ax.causal) +
         " periodic=" + std::to_string(ax.periodic);
}

// Calls f(axis) for every valid axis with length <= max_length: causal, periodic or
// neither.
template <class F>
void for_every_axis(int max_length, F&& f) {
  for (int L = 1; L <= max_length; ++L)
    for (int k = 1; k <= L; ++k)
      for (int d = 1; k * d <= L; ++d)
        for (int s = 1; s <= k; ++s) {
          f(Axis{L, k, d, s, false, false});
          f(Axis{L, k, d, s, true, false});
          f(Axis{L, k, d, s, false, true});
        }
}

TEST(Window, MatchesSpecExhaustivelyUpToLength12) {
  int64_t checked = 0;
  for_every_axis(12, [&](const Axis& ax) {
    const SpecAxis spec = spec_of(ax);
    for (int i = 0; i < ax.length; ++i) {
      const std::vector<int> expected = spec_axis_neighbors(spec, i);
      ASSERT_EQ(library_neighbors(ax, i), expected) << describe(ax) << " query=" << i;
      // The bias of every neighbor, from the key token and from its window entry.
      const int g = i % ax.dilation, lg = ax.group_length(g);
      const Range w = ax.window(i / ax.dilation, lg);
      for (int j = w.begin; j < w.end; ++j) {
        const int key = g + ax.dilation * ax.wrap(j, lg);
        ASSERT_EQ(Neighborhood::rpb_entry(ax, i, j), spec_axis_delta(spec, i, key)) << describe(ax) << " query=" << i;
        ASSERT_EQ(Neighborhood::rpb_index(ax, i, key), spec_axis_delta(spec, i, key)) << describe(ax) << " query=" << i;
      }
      ++checked;
    }
  });
  EXPECT_GT(checked, 15000);
}

TEST(Window, Properties) {
  for_every_axis(12, [&](const Axis& ax) {
    for (int i = 0; i < ax.length; ++i) {
      const std::vector<int> keys = library_neighbors(ax, i);
      // Non-causal windows hold exactly k distinct keys; causal ones at most k, ending
      // at the query.
      if (!ax.causal) EXPECT_EQ(int(std::set<int>(keys.begin(), keys.end()).size()), ax.kernel) << describe(ax);
      if (ax.causal) {
        EXPECT_LE(int(keys.size()), ax.kernel);
        EXPECT_EQ(keys.back(), i);
      }
      // Every query sees itself.
      EXPECT_NE(std::find(keys.begin(), keys.end(), i), keys.end());
      // rpb indices of neighbors stay in [0, 2k - 2].
      for (int key : keys) {
        const int r = Neighborhood::rpb_index(ax, i, key);
        EXPECT_GE(r, 0);
        EXPECT_LE(r, 2 * ax.kernel - 2);
      }
    }
  });
}

TEST(Window, InverseMatchesSearchOverAllQueries) {
  for_every_axis(12, [&](const Axis& ax) {
    for (int g = 0; g < ax.dilation; ++g) {
      const int lg = ax.group_length(g);
      for (int jk = 0; jk < lg; ++jk) {
        std::set<int> seeing;  // queries whose window holds the key
        for (int j = 0; j < lg; ++j) {
          const Range w = ax.window(j, lg);
          for (int x = w.begin; x < w.end; ++x)
            if (ax.wrap(x, lg) == jk) seeing.insert(j);
        }
        const Range inv = ax.inverse_window(jk, lg);
        // One range, each query once (periodic: unwrapped, at most lg long), and each
        // listed query's window, moved with it, holds the key itself.
        std::set<int> listed;
        for (int j = inv.begin; j < inv.end; ++j) {
          listed.insert(ax.wrap(j, lg));
          const Range w = ax.window(ax.wrap(j, lg), lg);
          const int moved = j - ax.wrap(j, lg);
          ASSERT_TRUE(w.begin + moved <= jk && jk < w.end + moved) << describe(ax) << " key=" << jk << " query=" << j;
        }
        ASSERT_EQ(int(listed.size()), inv.size()) << describe(ax) << " key=" << jk;
        ASSERT_EQ(listed, seeing) << describe(ax) << " key=" << jk;
        // The union over any run of keys ending here holds each one's inverse window.
        for (int first = 0; first <= jk; ++first) {
          const Range all = ax.inverse_window_union({first, jk + 1}, lg);
          for (int k = first; k <= jk; ++k) {
            const Range one = ax.inverse_window(k, lg);
            ASSERT_TRUE(one.size() <= 0 || (all.begin <= one.begin && one.end <= all.end))
                << describe(ax) << " keys " << first << ".." << jk;
          }
        }
      }
    }
  });
}

TEST(Window, UnionsCoverEveryMember) {
  for_every_axis(10, [&](const Axis& ax) {
    for (int g = 0; g < ax.dilation; ++g) {
      const int lg = ax.group_length(g);
      for (int b = 0; b < lg; ++b)
        for (int e = b + 1; e <= lg; ++e) {
          const Range u = ax.window_union({b, e}, lg);
          std::set<int> keys;
          for (int j = b; j < e; ++j)
            for (int x = ax.window(j, lg).begin; x < ax.window(j, lg).end; ++x) keys.insert(x);
          ASSERT_EQ(*keys.begin(), u.begin);
          ASSERT_EQ(*keys.rbegin() + 1, u.end);
          ASSERT_EQ(int(keys.size()), u.size());  // the union has no holes
        }
    }
  });
}

// wrap's one add or subtract in [-lg, 2 lg) and its remainders beyond agree with the
// plain modulus everywhere; a non-periodic axis keeps every index.
TEST(Window, WrapIsTheModulusOnAPeriodicAxis) {
  Axis ax;
  ax.periodic = true;
  for (int lg = 1; lg <= 9; ++lg)
    for (int j = -4 * lg - 3; j <= 4 * lg + 3; ++j) ASSERT_EQ(ax.wrap(j, lg), ((j % lg) + lg) % lg) << j << " " << lg;
  ax.periodic = false;
  for (int j = -5; j <= 12; ++j) EXPECT_EQ(ax.wrap(j, 4), j);
}

// Hand-worked cases, each written out from the spec by hand.
TEST(Window, HandWorkedCases) {
  auto keys = [](int L, int k, int d, int s, bool c, int i) { return library_neighbors(Axis{L, k, d, s, c}, i); };
  using V = std::vector<int>;
  // Odd kernel, borders shift inward: L=7, k=3.
  EXPECT_EQ(keys(7, 3, 1, 1, false, 0), (V{0, 1, 2}));
  EXPECT_EQ(keys(7, 3, 1, 1, false, 3), (V{2, 3, 4}));
  EXPECT_EQ(keys(7, 3, 1, 1, false, 6), (V{4, 5, 6}));
  // Even kernel: one more on the left. L=8, k=4: left 2, right 1.
  EXPECT_EQ(keys(8, 4, 1, 1, false, 3), (V{1, 2, 3, 4}));
  EXPECT_EQ(keys(8, 4, 1, 1, false, 7), (V{4, 5, 6, 7}));
  EXPECT_EQ(keys(8, 4, 1, 1, false, 1), (V{0, 1, 2, 3}));
  // Dilation with unequal groups: L=10, d=3 -> groups {0,3,6,9}, {1,4,7}, {2,5,8}.
  EXPECT_EQ(keys(10, 3, 3, 1, false, 9), (V{3, 6, 9}));
  EXPECT_EQ(keys(10, 3, 3, 1, false, 0), (V{0, 3, 6}));
  EXPECT_EQ(keys(10, 3, 3, 1, false, 4), (V{1, 4, 7}));
  EXPECT_EQ(keys(10, 3, 3, 1, false, 8), (V{2, 5, 8}));
  // Stride: L=9, k=3, s=3 -> blocked attention over {0,1,2}, {3,4,5}, {6,7,8}.
  EXPECT_EQ(keys(9, 3, 1, 3, false, 0), (V{0, 1, 2}));
  EXPECT_EQ(keys(9, 3, 1, 3, false, 5), (V{3, 4, 5}));
  // Stride 2 with k=4: leader of {2,3} is 3, window [1,5).
  EXPECT_EQ(keys(10, 4, 1, 2, false, 2), (V{1, 2, 3, 4}));
  // Stride with a partial last group: L=10, k=3, s=3; query 9 leads itself -> [7,10).
  EXPECT_EQ(keys(10, 3, 1, 3, false, 9), (V{7, 8, 9}));
  // Causal: window ends at the query.
  EXPECT_EQ(keys(8, 3, 1, 1, true, 0), (V{0}));
  EXPECT_EQ(keys(8, 3, 1, 1, true, 5), (V{3, 4, 5}));
  // Causal with stride: L=8, k=3, s=2, query 2 has leader 3 -> keys {1, 2}.
  EXPECT_EQ(keys(8, 3, 1, 2, true, 2), (V{1, 2}));
  // Causal with dilation 2: query 7 is index 3 of group 1 -> keys 3, 5, 7.
  EXPECT_EQ(keys(8, 3, 2, 1, true, 7), (V{3, 5, 7}));
  // Window = extent: full attention.
  EXPECT_EQ(keys(5, 5, 1, 1, false, 2), (V{0, 1, 2, 3, 4}));
  // Periodic, in window order: L=7, k=3 wraps at both ends instead of shifting.
  auto wrapped = [](int L, int k, int d, int s, int i) { return window_keys(Axis{L, k, d, s, false, true}, i); };
  EXPECT_EQ(wrapped(7, 3, 1, 1, 0), (V{6, 0, 1}));
  EXPECT_EQ(wrapped(7, 3, 1, 1, 6), (V{5, 6, 0}));
  EXPECT_EQ(wrapped(8, 4, 1, 1, 1), (V{7, 0, 1, 2}));  // even: one more on the left
  // Dilation 3 on L=10: group 1 is {1, 4, 7}; query 1 wraps to 7.
  EXPECT_EQ(wrapped(10, 3, 3, 1, 1), (V{7, 1, 4}));
  // Stride 3 on L=10: query 9 leads itself, window 8, 9, 0.
  EXPECT_EQ(wrapped(10, 3, 1, 3, 9), (V{8, 9, 0}));
  // The bias counts the unwrapped position: key 6, one left of query 0, has delta
  // k - 1 - 1 = 1 (not 6 - 0 + 2 = 8).
  EXPECT_EQ(Neighborhood::rpb_index(Axis{7, 3, 1, 1, false, true}, 0, 6), 1);
  EXPECT_EQ(Neighborhood::rpb_index(Axis{7, 3, 1, 1, false, true}, 6, 0), 3);  // one to the right
}

TEST(Window, AttendedPairsMatchesBruteForce) {
  Problem p;
  p.rank = 3;
  p.extent = {5, 8, 9};
  p.kernel = {3, 4, 5};
  p.dilation = {1, 2, 1};
  p.stride = {2, 1, 3};
  p.causal = {true, false, false};
  p.periodic = {false, true, false};
  p.dim = 8;
  ASSERT_TRUE(p.validate().ok());
  int64_t pairs = 0;
  for (int x0 = 0; x0 < 5; ++x0)
    for (int x1 = 0; x1 < 8; ++x1)
      for (int x2 = 0; x2 < 9; ++x2) {
        pairs += int64_t(spec_axis_neighbors({5, 3, 1, 2, true}, x0).size()) *
                 spec_axis_neighbors({8, 4, 2, 1, false, true}, x1).size() *
                 spec_axis_neighbors({9, 5, 1, 3, false}, x2).size();
      }
  EXPECT_EQ(p.attended_pairs(), pairs);
}

}  // namespace
}  // namespace nbhd
