// SPDX-License-Identifier: Apache-2.0
// A host emulation of the CUDA runtime subset the naive backend and its tests use,
// so that the kernels run on a machine without a GPU (tests/cuda/naive_emulator/run.py).
// "Device" memory is host memory, filled with 0xff bytes (NaN) when allocated, so a
// read of an unwritten element shows; blocks run one after another; a kernel that
// shuffles runs each warp as 32 fibers meeting at every shuffle, and dies if a lane
// leaves while others still shuffle (divergent shuffles are undefined on a GPU).
// It checks indexing and arithmetic, not speed, coalescing or the compiler.
#pragma once

#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <ucontext.h>
#include <vector>

#define __launch_bounds__(...)

namespace emu {

inline std::size_t device_bytes = std::size_t(4) << 30;  // what cudaMemGetInfo reports
inline thread_local uint3 thread_idx, block_idx;
inline thread_local dim3 block_dim, grid_dim;

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "emulated CUDA: %s\n", what);
  std::abort();
}

// The 32 lanes of a warp as fibers of one thread (ucontext): each runs until its
// next shuffle, and when all 32 are there they go on together.
class Warp {
 public:
  float values[32];

  // Runs job(lane) for the 32 lanes; `resume(lane)` is called before a lane runs.
  template <class Resume>
  void run(std::function<void(int)> job, Resume&& resume) {
    job_ = std::move(job);
    for (int l = 0; l < 32; ++l) {
      getcontext(&lane_[l]);
      lane_[l].uc_stack.ss_sp = stack(l);
      lane_[l].uc_stack.ss_size = kStack;
      lane_[l].uc_link = &main_;
      makecontext(&lane_[l], reinterpret_cast<void (*)()>(&Warp::entry), 2, int(reinterpret_cast<uintptr_t>(this) >> 32),
                  int(reinterpret_cast<uintptr_t>(this) & 0xffffffffu));
      state_[l] = kReady;
    }
    for (;;) {
      for (int l = 0; l < 32; ++l) {
        if (state_[l] == kExited) continue;
        current_ = l;
        resume(l);
        swapcontext(&main_, &lane_[l]);
      }
      int waiting = 0, exited = 0;
      for (int l = 0; l < 32; ++l) {
        waiting += state_[l] == kWaiting;
        exited += state_[l] == kExited;
      }
      if (exited == 32) return;
      if (exited > 0) die("a lane left the kernel while its warp shuffled (divergent shuffle)");
      for (int l = 0; l < 32; ++l) state_[l] = kReady;
    }
  }

  // Called by the current lane at a shuffle: wait for the other 31.
  void meet() {
    const int l = current_;
    state_[l] = kWaiting;
    swapcontext(&lane_[l], &main_);
  }

 private:
  static constexpr std::size_t kStack = std::size_t(1) << 20;
  enum State { kReady, kWaiting, kExited };

  static void entry(int hi, int lo) {
    Warp* w = reinterpret_cast<Warp*>((uintptr_t(unsigned(hi)) << 32) | uintptr_t(unsigned(lo)));
    const int l = w->current_;
    w->job_(l);
    w->state_[l] = kExited;
  }
  char* stack(int l) {
    static std::vector<char> stacks(32 * kStack);
    return stacks.data() + l * kStack;
  }

  std::function<void(int)> job_;
  ucontext_t main_, lane_[32];
  State state_[32];
  int current_ = 0;
};
inline thread_local Warp* warp = nullptr;

inline void set_index(dim3 grid, dim3 block, unsigned b, unsigned t) {
  grid_dim = grid;
  block_dim = block;
  block_idx = make_uint3(b, 0, 0);
  thread_idx = make_uint3(t, 0, 0);
}

// A kernel without shuffles: every thread in turn.
template <class P>
void launch(void (*kernel)(P), dim3 grid, dim3 block, const P& params) {
  for (unsigned b = 0; b < grid.x; ++b)
    for (unsigned t = 0; t < block.x; ++t) {
      set_index(grid, block, b, t);
      warp = nullptr;
      kernel(params);
    }
}

// A kernel with shuffles: warps in turn, the lanes of a warp together.
template <class P>
void launch_lockstep(void (*kernel)(P), dim3 grid, dim3 block, const P& params) {
  if (block.x % 32) die("lockstep launch with a partial warp");
  for (unsigned b = 0; b < grid.x; ++b)
    for (unsigned w = 0; w < block.x / 32; ++w) {
      Warp shared;
      warp = &shared;
      shared.run([&](int) { kernel(params); }, [&](int l) { set_index(grid, block, b, w * 32 + l); });
      warp = nullptr;
    }
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline float __shfl_xor_sync(unsigned mask, float v, int offset, int width = 32) {
  if (!emu::warp) emu::die("shuffle in a kernel launched without lockstep (see run.py)");
  if (mask != 0xffffffffu || width != 32) emu::die("only full-warp shuffles are emulated");
  const int lane = int(emu::thread_idx.x & 31);
  emu::warp->values[lane] = v;
  emu::warp->meet();
  const float r = emu::warp->values[int(emu::thread_idx.x & 31) ^ offset];
  emu::warp->meet();
  return r;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation" : "cudaErrorInvalidValue";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorMemoryAllocation ? "out of memory" : "invalid argument";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = nullptr;
  if (bytes > emu::device_bytes) return cudaErrorMemoryAllocation;
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  *free_bytes = *total_bytes = emu::device_bytes;
  return cudaSuccess;
}
