// SPDX-License-Identifier: Apache-2.0
// A bounded, thread-safe cache of plans (the fused backend's forward and backward
// tile choices). Planning runs outside the lock, so threads planning other problems
// never wait for it (two threads planning one key both plan; the first to insert
// wins), and the least recently used plan goes when the cache is full, so a process
// that sees many shapes (a server, a sweep) does not grow without bound.
#pragma once

#include <cstddef>
#include <list>
#include <map>
#include <mutex>
#include <utility>

namespace nbhd::detail {

// Plans per cache: a plan is a few hundred bytes with its key, and a model has a
// handful of shapes per layer; 1024 covers a sweep of the `paper` grid.
inline constexpr size_t kPlanCacheSize = 1024;

template <class Key, class Value>
class PlanCache {
 public:
  explicit PlanCache(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}

  // The cached value of `key`, else make() (called without the lock held), cached.
  template <class Make>
  Value get(const Key& key, Make&& make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (const auto it = index_.find(key); it != index_.end()) return touch(it->second);
    }
    Value made = make();
    std::lock_guard<std::mutex> lock(mutex_);
    if (const auto it = index_.find(key); it != index_.end()) return touch(it->second);
    recent_.emplace_front(key, std::move(made));
    index_.emplace(key, recent_.begin());
    if (recent_.size() > capacity_) {
      index_.erase(recent_.back().first);
      recent_.pop_back();
    }
    return recent_.front().second;
  }

  size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return recent_.size();
  }

 private:
  using Entries = std::list<std::pair<Key, Value>>;  // most recently used first
  const Value& touch(typename Entries::iterator entry) {
    recent_.splice(recent_.begin(), recent_, entry);
    return entry->second;
  }

  const size_t capacity_;
  mutable std::mutex mutex_;
  Entries recent_;
  std::map<Key, typename Entries::iterator> index_;
};

}  // namespace nbhd::detail
