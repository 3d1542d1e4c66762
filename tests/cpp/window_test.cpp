// SPDX-License-Identifier: Apache-2.0
// The neighborhood definition against the spec, exhaustively on small axes, and
// against hand-worked cases (even kernels, strides, unequal dilation groups).
#include <gtest/gtest.h>

#include <set>

#include "nbhd/core/window.hpp"
#include "nbhd/problem.hpp"
#include "spec_oracle.hpp"

namespace nbhd {
namespace {

using testing::SpecAxis;
using testing::spec_axis_neighbors;

// Keys of query i according to window.hpp, as axis indices.
std::vector<int> library_neighbors(const Axis& ax, int i) {
  const int g = i % ax.dilation;
  const Range w = ax.window(i / ax.dilation, ax.group_length(g));
  std::vector<int> keys;
  for (int j = w.begin; j < w.end; ++j) keys.push_back(g + ax.dilation * j);
  return keys;
}

// Calls f(axis) for every valid axis with length <= max_length, causal on and off.
template <class F>
void for_every_axis(int max_length, F&& f) {
  for (int L = 1; L <= max_length; ++L)
    for (int k = 1; k <= L; ++k)
      for (int d = 1; k * d <= L; ++d)
        for (int s = 1; s <= k; ++s)
          for (bool causal : {false, true}) f(Axis{L, k, d, s, causal});
}

TEST(Window, MatchesSpecExhaustivelyUpToLength12) {
  int64_t checked = 0;
  for_every_axis(12, [&](const Axis& ax) {
    const SpecAxis spec{ax.length, ax.kernel, ax.dilation, ax.stride, ax.causal};
    for (int i = 0; i < ax.length; ++i) {
      const std::vector<int> expected = spec_axis_neighbors(spec, i);
      ASSERT_EQ(library_neighbors(ax, i), expected)
          << "L=" << ax.length << " k=" << ax.kernel << " d=" << ax.dilation << " s=" << ax.stride
          << " causal=" << ax.causal << " query=" << i;
      ++checked;
    }
  });
  EXPECT_GT(checked, 10000);
}

TEST(Window, Properties) {
  for_every_axis(12, [&](const Axis& ax) {
    for (int i = 0; i < ax.length; ++i) {
      const std::vector<int> keys = library_neighbors(ax, i);
      // Non-causal windows hold exactly k keys; causal ones at most k, ending at the query.
      if (!ax.causal) EXPECT_EQ(int(keys.size()), ax.kernel);
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
        int first = -1, last = -1;
        for (int j = 0; j < lg; ++j)
          if (ax.window(j, lg).contains(jk)) {
            if (first < 0) first = j;
            last = j;
          }
        const Range inv = ax.inverse_window(jk, lg);
        ASSERT_EQ(inv.begin, first) << "L=" << ax.length << " k=" << ax.kernel << " s=" << ax.stride
                                    << " causal=" << ax.causal << " key=" << jk;
        ASSERT_EQ(inv.end, last + 1) << "L=" << ax.length << " k=" << ax.kernel << " s=" << ax.stride
                                     << " causal=" << ax.causal << " key=" << jk;
        // Contiguity: every query in between sees the key too.
        for (int j = first; j <= last; ++j) ASSERT_TRUE(ax.window(j, lg).contains(jk));
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
}

TEST(Window, AttendedPairsMatchesBruteForce) {
  Problem p;
  p.rank = 3;
  p.extent = {5, 8, 9};
  p.kernel = {3, 4, 5};
  p.dilation = {1, 2, 1};
  p.stride = {2, 1, 3};
  p.causal = {true, false, false};
  p.dim = 8;
  ASSERT_TRUE(p.validate().ok());
  int64_t pairs = 0;
  for (int x0 = 0; x0 < 5; ++x0)
    for (int x1 = 0; x1 < 8; ++x1)
      for (int x2 = 0; x2 < 9; ++x2) {
        pairs += int64_t(spec_axis_neighbors({5, 3, 1, 2, true}, x0).size()) *
                 spec_axis_neighbors({8, 4, 2, 1, false}, x1).size() * spec_axis_neighbors({9, 5, 1, 3, false}, x2).size();
      }
  EXPECT_EQ(p.attended_pairs(), pairs);
}

}  // namespace
}  // namespace nbhd
