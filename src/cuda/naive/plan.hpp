// SPDX-License-Identifier: Apache-2.0
// Host-side decisions of the naive backend, in plain C++ so the CPU tests cover
// them: lanes per row, when 16-byte loads are safe, how reductions over tokens are
// split, and the size of the attention-weight workspace.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/naive/walk.hpp"
#include "nbhd/problem.hpp"
#include "nbhd/tensor.hpp"

namespace nbhd::cuda::naive {

inline constexpr int kChunk = 8;         // elements a lane loads at once: 16 bytes of fp16
inline constexpr int kBlock = 256;       // threads per block of every naive kernel
inline constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond: 132 SMs x 8 blocks fill an H100 60x over

// Lanes that share one row: the power of two >= `work` (chunks or slots), at most a
// warp, so the rows of a warp never straddle it.
inline int lanes_for(int64_t work) {
  int lanes = 1;
  while (lanes < 32 && lanes < work) lanes *= 2;
  return lanes;
}

inline int log2_exact(int pow2) {
  int s = 0;
  while ((1 << s) < pow2) ++s;
  return s;
}

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int blocks_for(int64_t threads) {
  return int(std::clamp<int64_t>(ceil_div64(threads, kBlock), 1, kMaxBlocks));
}

// Whether a lane may load or store the kChunk elements of a row as 16-byte vectors:
// rows start on 16 bytes (base pointer and every outer stride), the last dimension is
// contiguous and a multiple of kChunk. Dimensions of size 1 never move the pointer,
// so their strides do not count. An undefined tensor is no obstacle.
inline bool rows_vectorizable(const TensorRef& t) {
  if (!t.defined() || t.ndim == 0) return true;
  const int64_t last = t.shape[t.ndim - 1];
  if (last % kChunk != 0) return false;
  if (last > 1 && t.stride[t.ndim - 1] != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  const int64_t per_16_bytes = 16 / size_of(t.dtype);
  for (int i = 0; i < t.ndim - 1; ++i)
    if (t.shape[i] > 1 && t.stride[i] % per_16_bytes != 0) return false;
  return true;
}

// A sum over `items` (tokens) for each of `outputs` values, done deterministically in
// two passes: `splits` partial sums of `per_split` items each, then their sum. At
// least `min_per_split` items per split (a thread's loop), and about `max_partials`
// partial sums at most (their scratch memory).
struct Split {
  int64_t splits;
  int64_t per_split;
};

inline Split plan_split(int64_t items, int64_t outputs, int64_t min_per_split = 64, int64_t max_partials = 1 << 22) {
  const int64_t cap = std::max<int64_t>(1, max_partials / std::max<int64_t>(outputs, 1));
  const int64_t splits = std::clamp<int64_t>(ceil_div64(items, min_per_split), 1, cap);
  const int64_t per_split = ceil_div64(items, splits);
  return {ceil_div64(items, per_split), per_split};
}

// Rows of the attention weights (batch * query tokens * heads) and slots per row (window +
// additional tokens).
inline int64_t weight_rows(const Problem& p) { return p.batch * p.query_tokens() * p.heads; }
// The query rows the kernels walk: the problem's query sub-box, or the grid.
inline TokenBox query_box(const Problem& p) {
  TokenBox box{};
  for (int a = 0; a < kMaxRank; ++a) {
    const Range r = p.padded_query_range(a);
    box.begin[a] = r.begin;
    box.extent[a] = r.size();
  }
  return box;
}

inline int64_t weight_slots(const Problem& p) { return p.window_size() + p.additional_tokens; }

// Bytes of float32 attention weights; false when the count overflows 64 bits.
inline bool weight_bytes(const Problem& p, int64_t* bytes) {
  int64_t n = 0;
  return !__builtin_mul_overflow(weight_rows(p), weight_slots(p), &n) && !__builtin_mul_overflow(n, int64_t(4), bytes);
}

}  // namespace nbhd::cuda::naive
