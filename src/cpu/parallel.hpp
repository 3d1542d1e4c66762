// SPDX-License-Identifier: Apache-2.0
// parallel_for over [0, n) on a persistent pool of threads, work handed out in chunks
// from an atomic counter (tiles differ in cost at borders and with causal masks).
// The caller says how many workers (Options::num_threads; the Python package passes
// torch.get_num_threads(), numpy callers get every hardware thread): the pool grows
// to the largest count asked for and keeps its threads parked between calls, so a
// call no longer starts and joins a thread per core (what every call did before).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace nbhd::cpu {

inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? int(hw) : 1;
}

// The pool: job(w) runs on helper thread w - 1 for w in [1, workers), the caller runs
// job(0). One job at a time; a caller that finds the pool busy (another thread's
// call) runs its job on threads of its own, as before. A process forked from one
// with a pool (a DataLoader worker) starts its own: threads do not survive fork.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool;  // never destroyed: parked threads at exit are fine
    return *pool;
  }

  // Helper threads the pool holds (for the tests).
  int helpers() {
    std::lock_guard<std::mutex> lock(mutex_);
    return owner_ == getpid() ? int(threads_.size()) : 0;
  }

  void run(int workers, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return run_on_own_threads(workers, job);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (owner_ != getpid()) {  // a forked child: its parent's threads are not here
        new std::vector<std::thread>(std::move(threads_));  // handles of threads that do not exist: leaked
        threads_.clear();
        owner_ = getpid();
      }
      while (int(threads_.size()) < workers - 1) {
        const int helper = int(threads_.size());
        threads_.emplace_back([this, helper] { park(helper); });
      }
      job_ = &job;
      wanted_ = workers - 1;
      pending_ = workers - 1;
      ++generation_;
    }
    wake_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  ThreadPool() = default;

  void park(int helper) {
    int64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (helper >= wanted_) continue;  // this job needs fewer workers
        job = job_;
      }
      (*job)(helper + 1);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  static void run_on_own_threads(int workers, const std::function<void(int)>& job) {
    std::vector<std::thread> threads;
    for (int w = 1; w < workers; ++w) threads.emplace_back(job, w);
    job(0);
    for (std::thread& t : threads) t.join();
  }

  std::mutex run_mutex_;  // held for a whole job
  std::mutex mutex_;      // guards what follows
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  pid_t owner_ = getpid();
  const std::function<void(int)>* job_ = nullptr;
  int wanted_ = 0, pending_ = 0;
  int64_t generation_ = 0;
};

// f(i, worker) for every i in [0, n); worker in [0, workers) is stable per thread,
// for per-thread scratch and partial sums.
template <class F>
void parallel_for(int64_t n, int workers, F&& f) {
  workers = int(std::max<int64_t>(1, std::min<int64_t>(workers, n)));
  if (workers == 1) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  const std::function<void(int)> run = [&](int worker) {
    try {
      for (int64_t i; (i = next.fetch_add(1)) < n;) f(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  };
  ThreadPool::instance().run(workers, run);
  if (error) std::rethrow_exception(error);
}

// f(i, worker, block) for every i in [0, n), cut into min(n, blocks) blocks of
// consecutive i, each walked in order by one worker: sums kept per block and added
// in block order give the same bits for any thread count and schedule (the dynamic
// hand-out of parallel_for gives each worker's partial sums different terms from
// run to run).
template <class F>
void parallel_for_blocks(int64_t n, int64_t blocks, int workers, F&& f) {
  blocks = std::max<int64_t>(1, std::min(n, blocks));
  parallel_for(blocks, workers, [&](int64_t block, int worker) {
    for (int64_t i = block * n / blocks, end = (block + 1) * n / blocks; i < end; ++i) f(i, worker, block);
  });
}

}  // namespace nbhd::cpu
