// SPDX-License-Identifier: Apache-2.0
// cpu/parallel.hpp: parallel_for runs every index once on the workers it is given,
// reuses the pool's threads from call to call (it started a thread per worker on
// every call before), never uses more workers than asked for, survives concurrent
// callers, and passes a worker's exception to the caller.
#include "cpu/parallel.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

namespace nbhd::cpu {
namespace {

std::set<std::thread::id> threads_of(int64_t n, int workers, std::vector<int>* hits) {
  std::mutex m;
  std::set<std::thread::id> ids;
  std::vector<std::atomic<int>> count(n);
  parallel_for(n, workers, [&](int64_t i, int worker) {
    EXPECT_GE(worker, 0);
    EXPECT_LT(worker, workers);
    ++count[i];
    std::lock_guard<std::mutex> lock(m);
    ids.insert(std::this_thread::get_id());
    std::this_thread::sleep_for(std::chrono::microseconds(50));  // let every worker take some
  });
  for (auto& c : count) hits->push_back(c.load());
  return ids;
}

TEST(ParallelFor, EveryIndexOnceOnAtMostTheWorkersAskedFor) {
  for (int workers : {1, 2, 3, 5}) {
    std::vector<int> hits;
    const auto ids = threads_of(400, workers, &hits);
    EXPECT_LE(int(ids.size()), workers);
    for (int h : hits) ASSERT_EQ(h, 1);
  }
}

TEST(ParallelFor, ThePoolKeepsItsThreadsAcrossCalls) {
  std::vector<int> hits;
  threads_of(400, 4, &hits);
  const int helpers = ThreadPool::instance().helpers();
  EXPECT_GE(helpers, 3);
  std::set<std::thread::id> all;
  for (int call = 0; call < 20; ++call) {
    const auto ids = threads_of(200, 4, &hits);
    all.insert(ids.begin(), ids.end());
  }
  // The caller and the pool's helpers, not a new thread per worker and call.
  EXPECT_EQ(ThreadPool::instance().helpers(), helpers);
  EXPECT_LE(int(all.size()), helpers + 1);
  threads_of(100, 2, &hits);  // fewer workers: no new threads
  EXPECT_EQ(ThreadPool::instance().helpers(), helpers);
}

TEST(ParallelFor, ConcurrentCallersEachFinish) {
  std::vector<std::thread> callers;
  std::atomic<int64_t> sum{0};
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 10; ++rep) parallel_for(1000, 3, [&](int64_t i, int) { sum += i; });
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum.load(), 4 * 10 * (999 * 1000 / 2));
}

TEST(ParallelFor, AWorkersExceptionReachesTheCaller) {
  EXPECT_THROW(parallel_for(100, 4,
                            [](int64_t i, int) {
                              if (i == 37) throw std::runtime_error("tile 37");
                            }),
               std::runtime_error);
  std::vector<int> hits;
  threads_of(50, 4, &hits);  // the pool still works
  for (int h : hits) ASSERT_EQ(h, 1);
}

}  // namespace
}  // namespace nbhd::cpu
