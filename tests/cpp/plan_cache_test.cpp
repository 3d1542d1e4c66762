// SPDX-License-Identifier: Apache-2.0
// The plan cache: bounded (least recently used out), and planning outside its lock.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include "core/plan_cache.hpp"

namespace nbhd {
namespace {

using detail::PlanCache;

TEST(PlanCache, HitsDoNotPlanAgain) {
  PlanCache<int, std::string> cache(4);
  int plans = 0;
  auto make = [&] { return std::to_string(++plans); };
  EXPECT_EQ(cache.get(7, make), "1");
  EXPECT_EQ(cache.get(7, make), "1");
  EXPECT_EQ(plans, 1);
}

TEST(PlanCache, TheLeastRecentlyUsedPlanGoesWhenFull) {
  PlanCache<int, int> cache(3);
  int plans = 0;
  auto plan = [&](int key) { return cache.get(key, [&] { ++plans; return 10 * key; }); };
  plan(1), plan(2), plan(3);
  plan(1);  // 2 is now the least recently used
  plan(4);  // evicts 2
  EXPECT_EQ(cache.size(), 3u);
  EXPECT_EQ(plans, 4);
  plan(1), plan(3), plan(4);
  EXPECT_EQ(plans, 4);  // all three still cached
  EXPECT_EQ(plan(2), 20);
  EXPECT_EQ(plans, 5);  // 2 was planned again
  EXPECT_EQ(cache.size(), 3u);
}

// Planning runs without the cache's lock: a plan that uses the cache (here, its
// size) completes. With the lock held while planning it would wait for ever; the
// test gives it 10 seconds.
TEST(PlanCache, PlanningRunsOutsideTheLock) {
  auto cache = std::make_shared<PlanCache<int, size_t>>(4);
  auto result = std::make_shared<std::promise<size_t>>();  // shared: the thread may outlive a failed test
  std::future<size_t> done = result->get_future();
  std::thread([cache, result] { result->set_value(cache->get(1, [&] { return cache->size() + 100; })); }).detach();
  ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready) << "planning waited for the cache's lock";
  EXPECT_EQ(done.get(), 100u);
}

}  // namespace
}  // namespace nbhd
