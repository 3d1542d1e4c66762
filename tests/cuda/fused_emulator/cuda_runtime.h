// SPDX-License-Identifier: Apache-2.0
// A host emulation of the CUDA runtime and device subset the fused kernels use, so
// they run without a GPU (tests/cuda/fused_emulator/run.py). Every thread of a block
// is a fiber (ucontext); a fiber runs until a warp collective (mma.sync, ldmatrix,
// shuffle, ballot, __syncwarp), which completes once all 32 lanes are there, or a
// __syncthreads, which completes once every thread is there, or a warpgroup barrier
// (wgmma), or a named barrier (bar.sync id, count), which completes once `count`
// threads are there, or an mbarrier wait, which completes with the awaited phase. Divergent
// collectives and barriers (a lane missing, a thread exited) abort. cp.async copies
// land at the issuing thread's cp.async.wait_group or mbarrier arrival
// (EMU_CP_ASYNC=late, the default) or at issue (=early): the two ends of the window
// a real copy may land in, so a missing wait or barrier, or a prefetch over data
// still being read, shows in one of the runs. wgmmas execute likewise at the
// wait_group that retires them (EMU_WGMMA=late, the default) or at issue (=early);
// late aborts on a write to an in-flight wgmma's registers (cuda/common/wgmma.cuh).
// EMU_SCHEDULE=reverse runs fibers in the opposite order between sync points.
// EMU_MMA_ROUND=zero rounds every mma result toward zero (see accumulator_round).
// "Device" memory is host memory filled with 0xff (NaN) when allocated, on one of
// EMU_DEVICES devices (default 2; see launch). It checks indexing, fragment layouts,
// arithmetic and which device a launch uses, not speed or the compiler.
#pragma once

#include <cuda.h>  // CUtensorMap and the tensor-map encoder's types
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <type_traits>
#include <utility>
#include <functional>
#include <string>
#include <ucontext.h>
#include <vector>

#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__

namespace emu {

[[noreturn]] inline void die(const char* what, int thread = -1) {
  std::fprintf(stderr, "emulated CUDA: %s (thread %d)\n", what, thread);
  std::abort();
}

// Warp collectives: what each lane brings and takes.
enum class Op { kNone, kMma, kLdmatrix, kShfl, kBallot, kSyncwarp };

struct Lane {
  Op op = Op::kNone;
  int variant = 0;  // mma: 1 = bf16; ldmatrix: 1 = transposed
  bool pred = true;
  uint32_t a[4], b[2], addr;
  uint64_t desc[2];  // wgmma: the operands' shared-memory descriptors
  int wgmma_pending = 0;  // wgmmas issued, not yet executed (EMU_WGMMA=late)
  float c[4], value;
  uint32_t out[4];
  float fout[4];
};

// What the emulated cuTensorMapEncodeTiled stores in a CUtensorMap's 128 bytes.
struct TensorMapModel {
  const unsigned char* base;
  uint64_t extent[5];
  uint64_t stride[4];  // bytes, dims 1..
  uint32_t box[5], element_stride[5];
  uint8_t dims, element_bytes, swizzle_128;
};
static_assert(sizeof(TensorMapModel) <= sizeof(CUtensorMap), "the model fits a tensor map");

struct PendingCopy {
  uint32_t dst;
  const void* src;
  int bytes, valid;
  int group;
};

class Block {
 public:
  Block(unsigned index, dim3 grid, dim3 block, std::size_t smem_bytes)
      : index_(index), grid_(grid), dim_(block), smem_(smem_bytes + 16, 0xcd), fibers_(block.x) {
    if (block.x % 32) die("blocks must be whole warps");
  }

  template <class F>
  void run(F&& body) {
    body_ = [&] { body(); };
    const int n = int(dim_.x);
    static std::vector<char> stacks;
    stacks.resize(std::size_t(n) * kStack);
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks.data() + std::size_t(t) * kStack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Block::entry), 0);
      f.state = kReady;
    }
    const bool reverse = std::getenv("EMU_SCHEDULE") && std::string(std::getenv("EMU_SCHEDULE")) == "reverse";
    for (;;) {
      for (int i = 0; i < n; ++i) {
        const int t = reverse ? n - 1 - i : i;
        if (fibers_[t].state != kReady) continue;
        current_ = t;
        swapcontext(&main_, &fibers_[t].ctx);
      }
      // Every fiber now waits or has exited. Complete the warp collectives that all
      // 32 lanes reached; else release a barrier all threads reached; else stuck.
      bool progress = false;
      int exited = 0, at_barrier = 0;
      for (int w = 0; w < n / 32; ++w) {
        int at_op = 0, lane_exited = 0;
        for (int l = 0; l < 32; ++l) {
          const State s = fibers_[w * 32 + l].state;
          at_op += s == kAtWarpOp;
          lane_exited += s == kExited;
        }
        exited += lane_exited;
        if (at_op == 0) continue;
        if (at_op != 32) {
          if (lane_exited) die("a warp collective with exited lanes", w * 32);
          continue;  // some lanes still at a barrier: stuck unless others move
        }
        execute(w);
        for (int l = 0; l < 32; ++l) fibers_[w * 32 + l].state = kReady;
        progress = true;
      }
      if (exited == n) {
        for (const auto& [id, pending] : named_arrivals_)
          if (pending.arrived) die("named barrier: bar.arrive with no matching bar.sync before the block exits", -1);
        return;
      }
      if (progress) continue;
      // Warpgroup barriers (wgmma) whose 128 threads are all there; mbarrier waits
      // whose phase has completed.
      for (int g = 0; g < n / 128; ++g) {
        int at = 0;
        for (int t = 128 * g; t < 128 * g + 128; ++t) at += fibers_[t].state == kAtGroupBarrier;
        if (at != 128) continue;
        for (int t = 128 * g; t < 128 * g + 128; ++t) fibers_[t].state = kReady;
        progress = true;
      }
      // Named barriers: id -> threads there; released when they and the threads
      // that arrived without waiting (bar.arrive) make the count they all name.
      std::map<int, int> at_named;
      for (int t = 0; t < n; ++t)
        if (fibers_[t].state == kAtNamedBarrier) ++at_named[fibers_[t].barrier_id];
      for (auto [id, count] : at_named) {
        int expected = -1;
        for (int t = 0; t < n; ++t) {
          if (fibers_[t].state != kAtNamedBarrier || fibers_[t].barrier_id != id) continue;
          if (expected >= 0 && fibers_[t].barrier_count != expected) die("named barrier: threads name different counts", t);
          expected = fibers_[t].barrier_count;
        }
        NamedArrivals& pending = named_arrivals_[id];
        if (pending.arrived && pending.count != expected) die("named barrier: bar.arrive and bar.sync name different counts", -1);
        count += pending.arrived;
        if (count > expected) die("named barrier: more threads than its count", -1);
        if (count < expected) continue;
        for (int t = 0; t < n; ++t)
          if (fibers_[t].state == kAtNamedBarrier && fibers_[t].barrier_id == id) fibers_[t].state = kReady;
        pending.arrived = 0;
        progress = true;
      }
      for (int t = 0; t < n; ++t)
        if (fibers_[t].state == kAtRegisterClaim && registers_fit()) {
          fibers_[t].state = kReady;
          progress = true;
        }
      for (int t = 0; t < n; ++t)
        if (fibers_[t].state == kAtMbarrier && (land_tma(fibers_[t].wait_address),
                                                mbarrier_done(fibers_[t].wait_address, fibers_[t].wait_parity))) {
          fibers_[t].state = kReady;
          progress = true;
        }
      if (progress) continue;
      for (int t = 0; t < n; ++t) at_barrier += fibers_[t].state == kAtBarrier;
      if (at_barrier + exited == n) {
        if (exited) die("__syncthreads with exited threads");
        for (int t = 0; t < n; ++t) fibers_[t].state = kReady;
        continue;
      }
      for (int t = 0; t < n; ++t)
        if (fibers_[t].state == kAtRegisterClaim)
          die("deadlock: a setmaxnreg.inc waits for registers the CTA's launch allocation does not have", t);
      die("deadlock: threads wait at different collectives (divergent warp op or barrier)");
    }
  }

  // Called by the running fiber.
  int thread() const { return current_; }
  unsigned index() const { return index_; }
  dim3 grid() const { return grid_; }
  dim3 dim() const { return dim_; }
  unsigned char* smem() { return smem_.data(); }
  std::size_t smem_size() const { return smem_.size() - 16; }
  Lane& lane() { return lanes_[current_]; }
  Lane& lane_of(int t) { return lanes_[t]; }
  void warp_op() { wait(kAtWarpOp); }
  void barrier() { wait(kAtBarrier); }
  // The 128 threads of the running thread's warpgroup.
  void group_barrier() { wait(kAtGroupBarrier); }
  // setmaxnreg: warpgroup registers moved within the CTA's launch allocation (at
  // most the 64 K file over its threads, in steps of 8, 255 at most). A claim
  // (.inc) waits until the warpgroups' counts fit it; one that never can is a
  // deadlock, as on the GPU.
  void set_registers(int count, bool claim) {
    if (count % 8 || count < 24 || count > 256) die("setmaxnreg: count must be a multiple of 8 in [24, 256]", current_);
    const int groups = int(dim_.x + 127) / 128;
    if (registers_.empty()) registers_.assign(std::size_t(groups), launch_registers());
    int& mine = registers_[std::size_t(current_ / 128)];
    if (claim ? count < mine : count > mine) die("setmaxnreg: .inc lowers or .dec raises the count", current_);
    mine = count;
    if (claim && !registers_fit()) wait(kAtRegisterClaim);
  }
  int launch_registers() const { return std::min(255, int(65536 / dim_.x) / 8 * 8); }
  bool registers_fit() const {
    long total = 0;
    for (int r : registers_) total += long(r) * 128;
    return total <= long(launch_registers()) * long(dim_.x);
  }
  // bar.sync id, count: whole warps, so the count is a multiple of 32.
  void named_barrier(int id, int count) {
    if (id < 1 || id > 15 || count % 32 || count <= 0 || count > int(dim_.x)) die("named barrier: bad id or count", current_);
    fibers_[current_].barrier_id = id;
    fibers_[current_].barrier_count = count;
    wait(kAtNamedBarrier);
  }
  // bar.arrive id, count: counts toward the barrier's current phase and goes on. A
  // phase cannot take more arrivals than its count (the syncing side must come
  // first), and none may be left over when the block exits.
  void named_arrive(int id, int count) {
    if (id < 1 || id > 15 || count % 32 || count <= 0 || count > int(dim_.x)) die("named barrier: bad id or count", current_);
    NamedArrivals& pending = named_arrivals_[id];
    if (pending.arrived && pending.count != count) die("named barrier: bar.arrive threads name different counts", current_);
    pending.count = count;
    int waiting = 0;
    for (std::size_t t = 0; t < fibers_.size(); ++t)
      waiting += fibers_[t].state == kAtNamedBarrier && fibers_[t].barrier_id == id;
    if (++pending.arrived + waiting > count) die("named barrier: more arrivals than its count in one phase", current_);
  }

  // mbarriers, by shared-memory address: arrivals still expected in the current
  // phase, and the number of completed phases.
  void mbarrier_init(uint32_t address, int arrivals) {
    if (address % 8 || address + 8 > smem_size()) die("mbarrier outside shared memory or misaligned", current_);
    mbarriers_[address] = Mbarrier{arrivals, arrivals, 0, 0};
  }
  void mbarrier_arrive(uint32_t address) {
    auto it = mbarriers_.find(address);
    if (it == mbarriers_.end()) die("arrive on an uninitialised mbarrier", current_);
    Mbarrier& m = it->second;
    if (m.pending == 0) die("mbarrier: more arrivals than its count in one phase", current_);
    --m.pending;
    complete_if_done(m);
  }
  // mbarrier.arrive.expect_tx: the phase also waits for `bytes` of transactions.
  void mbarrier_expect_tx(uint32_t address, int64_t bytes) {
    auto it = mbarriers_.find(address);
    if (it == mbarriers_.end()) die("expect_tx on an uninitialised mbarrier", current_);
    it->second.tx += bytes;
    mbarrier_arrive(address);
  }

  // cp.async.bulk.tensor of the running thread: the box lands at issue
  // (EMU_CP_ASYNC=early) or once a thread waits on its barrier (late), written where
  // the hardware writes it (the 128-byte swizzle from the shared-memory address
  // bits: 16-byte chunk bits 4-6 XOR bits 7-9), zero outside the tensor; its bytes
  // complete transactions of the barrier.
  void tma_load(const TensorMapModel& m, uint32_t dst, uint32_t barrier, const int32_t* c, int dims) {
    if (dims != m.dims) die("TMA copy with a coordinate count unlike its tensor map's dims", current_);
    if (dst % 128) die("TMA destination not 128-byte aligned", current_);
    if (!mbarriers_.count(barrier)) die("TMA copy completing on an uninitialised mbarrier", current_);
    PendingTma t{m, dst, barrier, {}};
    for (int i = 0; i < dims; ++i) t.c[i] = c[i];
    if (early()) land(t);
    else tma_.push_back(t);
  }
  // cp.async.mbarrier.arrive.noinc: the thread's copies so far land, then it arrives.
  void mbarrier_arrive_after_copies(uint32_t address) {
    Fiber& f = fibers_[current_];
    for (const PendingCopy& c : f.pending) land(c);
    f.pending.clear();
    mbarrier_arrive(address);
  }
  void mbarrier_wait(uint32_t address, uint32_t parity) {
    if (!mbarriers_.count(address)) die("wait on an uninitialised mbarrier", current_);
    land_tma(address);
    if (mbarrier_done(address, parity)) return;
    fibers_[current_].wait_address = address;
    fibers_[current_].wait_parity = parity;
    wait(kAtMbarrier);
  }
  void cp_async_wait_all() {
    Fiber& f = fibers_[current_];
    for (const PendingCopy& c : f.pending) land(c);
    f.pending.clear();
  }

  // cp.reduce.async.bulk .add.f32 of the running thread: the shared-memory source is
  // read (and added to global memory) at the thread's wait for its group (late) or
  // at issue (early), the two ends of the window a real bulk operation reads in.
  void bulk_reduce_add(float* dst, uint32_t src, int bytes) {
    if (bytes % 16 || src % 16 || src + uint32_t(bytes) > smem_size() || reinterpret_cast<uintptr_t>(dst) % 16)
      die("bulk reduce-add: size, alignment or source out of shared memory", current_);
    Fiber& f = fibers_[current_];
    const PendingBulk b{dst, src, bytes, f.bulk_groups};
    if (early()) land(b);
    else f.bulk.push_back(b);
  }
  void bulk_commit() { ++fibers_[current_].bulk_groups; }
  void bulk_wait(int keep) {
    Fiber& f = fibers_[current_];
    std::vector<PendingBulk> still;
    for (const PendingBulk& b : f.bulk) {
      if (b.group < f.bulk_groups - keep) land(b);
      else still.push_back(b);
    }
    f.bulk.swap(still);
  }

  // cp.async of the running thread.
  void cp_async(uint32_t dst, const void* src, int bytes, int valid) {
    if (dst % bytes || dst + bytes > smem_size()) die("cp.async destination out of shared memory or misaligned", current_);
    if (valid != 0 && valid != bytes) die("cp.async with a partial source size", current_);
    if (valid && reinterpret_cast<uintptr_t>(src) % bytes) die("cp.async source misaligned", current_);
    Fiber& f = fibers_[current_];
    const PendingCopy c{dst, src, bytes, valid, f.groups};
    if (early()) land(c);
    else f.pending.push_back(c);
  }
  void cp_async_commit() { ++fibers_[current_].groups; }
  void cp_async_wait(int keep) {
    Fiber& f = fibers_[current_];
    std::vector<PendingCopy> still;
    for (const PendingCopy& c : f.pending) {
      if (c.group < f.groups - keep) land(c);
      else still.push_back(c);
    }
    f.pending.swap(still);
  }

 private:
  static constexpr std::size_t kStack = std::size_t(256) << 10;
  enum State { kReady, kAtWarpOp, kAtBarrier, kAtGroupBarrier, kAtNamedBarrier, kAtMbarrier, kAtRegisterClaim, kExited };
  struct PendingBulk {
    float* dst;
    uint32_t src;
    int bytes, group;
  };
  struct Fiber {
    ucontext_t ctx;
    State state;
    int groups = 0, bulk_groups = 0;
    std::vector<PendingCopy> pending;
    std::vector<PendingBulk> bulk;
    uint32_t wait_address = 0, wait_parity = 0;
    int barrier_id = 0, barrier_count = 0;
  };
  struct Mbarrier {
    int arrivals, pending;
    uint32_t phases;
    int64_t tx = 0;  // transaction bytes the phase still waits for
  };
  struct PendingTma {
    TensorMapModel map;
    uint32_t dst, barrier;
    int32_t c[5];
  };
  void complete_if_done(Mbarrier& m) {
    if (m.pending == 0 && m.tx == 0) {
      m.pending = m.arrivals;
      ++m.phases;
    }
  }
  // Lands the queued TMA copies that complete on `barrier` (late mode).
  void land_tma(uint32_t barrier) {
    std::vector<PendingTma> still;
    for (const PendingTma& t : tma_) {
      if (t.barrier == barrier) land(t);
      else still.push_back(t);
    }
    tma_.swap(still);
  }
  void land(const PendingTma& t) {
    const TensorMapModel& m = t.map;
    int count[5];
    int64_t elements = 1;
    for (int i = 0; i < m.dims; ++i) {
      count[i] = int((m.box[i] + m.element_stride[i] - 1) / m.element_stride[i]);
      elements *= count[i];
    }
    const int64_t row_bytes = int64_t(count[0]) * m.element_bytes;
    if (m.swizzle_128 && row_bytes != 128) die("emulated TMA: the 128-byte swizzle is emulated for 128-byte rows only");
    if (t.dst + elements * m.element_bytes > smem_size()) die("TMA box past the end of shared memory");
    for (int64_t n = 0; n < elements; ++n) {
      int64_t rest = n, offset = 0;
      bool inside = true;
      for (int i = 0; i < m.dims; ++i) {
        const int64_t k = rest % count[i];
        rest /= count[i];
        const int64_t coordinate = int64_t(t.c[i]) + k * m.element_stride[i];
        inside &= coordinate >= 0 && coordinate < int64_t(m.extent[i]);
        offset += coordinate * (i == 0 ? int64_t(m.element_bytes) : int64_t(m.stride[i - 1]));
      }
      uint32_t at = t.dst + uint32_t(n * m.element_bytes);
      if (m.swizzle_128) at ^= ((at >> 7) & 7u) << 4;
      if (inside) std::memcpy(smem_.data() + at, m.base + offset, m.element_bytes);
      else std::memset(smem_.data() + at, 0, m.element_bytes);
    }
    Mbarrier& b = mbarriers_.at(t.barrier);
    b.tx -= elements * m.element_bytes;
    complete_if_done(b);
  }
  // The phase with this parity has completed once the current phase's parity differs.
  bool mbarrier_done(uint32_t address, uint32_t parity) const {
    return (mbarriers_.at(address).phases & 1u) != (parity & 1u);
  }

  static bool early() {
    static const bool e = std::getenv("EMU_CP_ASYNC") && std::string(std::getenv("EMU_CP_ASYNC")) == "early";
    return e;
  }
  void land(const PendingBulk& b) {
    for (int i = 0; i < b.bytes / 4; ++i) {
      float x;
      std::memcpy(&x, smem_.data() + b.src + 4 * i, 4);
      b.dst[i] += x;
    }
  }
  void land(const PendingCopy& c) {
    if (c.valid) std::memcpy(smem_.data() + c.dst, c.src, c.bytes);
    else std::memset(smem_.data() + c.dst, 0, c.bytes);
  }
  void wait(State s) {
    fibers_[current_].state = s;
    swapcontext(&fibers_[current_].ctx, &main_);
  }
  static void entry();
  void execute(int w);

  unsigned index_;
  dim3 grid_, dim_;
  std::vector<unsigned char> smem_;
  std::vector<Fiber> fibers_;
  std::map<uint32_t, Mbarrier> mbarriers_;
  // Per named barrier id: threads that arrived (bar.arrive) in its current phase.
  struct NamedArrivals {
    int count = 0, arrived = 0;
  };
  std::map<int, NamedArrivals> named_arrivals_;
  std::vector<PendingTma> tma_;
  std::vector<int> registers_;  // per warpgroup, once a setmaxnreg ran
  Lane lanes_[1024];
  std::function<void()> body_;
  ucontext_t main_;
  int current_ = 0;
};

inline Block* block = nullptr;

inline void Block::entry() {
  Block* b = emu::block;
  b->body_();
  if (!b->fibers_[b->current_].pending.empty()) die("a thread exited with cp.async copies not waited for", b->current_);
  if (!b->fibers_[b->current_].bulk.empty()) die("a thread exited with bulk operations not waited for", b->current_);
  if (b->lanes_[b->current_].wgmma_pending) die("a thread exited with wgmmas not waited for (wgmma.wait_group)", b->current_);
  b->fibers_[b->current_].state = kExited;
}

// 16-bit element `i` (0 or 1) of a packed register, as float.
float half_of(uint32_t r, int i, bool bf16);
float tf32_of(uint32_t r);
float accumulator_round(double s);
uint16_t smem16(int w, uint32_t addr);

inline void Block::execute(int w) {
  Lane* L = &lanes_[w * 32];
  const Op op = L[0].op;
  for (int l = 1; l < 32; ++l)
    if (L[l].op != op || L[l].variant != L[0].variant) die("lanes of a warp at different collectives", w * 32 + l);
  switch (op) {
    case Op::kMma: {
      for (int l = 1; l < 32; ++l)
        if (L[l].pred != L[0].pred) die("mma.sync predicate differs across the warp", w * 32 + l);
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) L[l].fout[e] = L[l].c[e];
      if (!L[0].pred) break;
      // variant 0 / 1: m16n8k16 fp16 / bf16; 2: m16n8k8 tf32 (the low 13 bits of each
      // operand ignored, as the tensor cores read 19 of the 32).
      const int kk = L[0].variant == 2 ? 8 : 16;
      double A[16][16], B[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        if (kk == 8) {
          A[g][t] = tf32_of(L[l].a[0]);
          A[g + 8][t] = tf32_of(L[l].a[1]);
          A[g][t + 4] = tf32_of(L[l].a[2]);
          A[g + 8][t + 4] = tf32_of(L[l].a[3]);
          B[t][g] = tf32_of(L[l].b[0]);
          B[t + 4][g] = tf32_of(L[l].b[1]);
          continue;
        }
        const bool bf16 = L[0].variant == 1;
        for (int i = 0; i < 2; ++i) {
          A[g][2 * t + i] = half_of(L[l].a[0], i, bf16);
          A[g + 8][2 * t + i] = half_of(L[l].a[1], i, bf16);
          A[g][2 * t + 8 + i] = half_of(L[l].a[2], i, bf16);
          A[g + 8][2 * t + 8 + i] = half_of(L[l].a[3], i, bf16);
          B[2 * t + i][g] = half_of(L[l].b[0], i, bf16);
          B[2 * t + 8 + i][g] = half_of(L[l].b[1], i, bf16);
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 4; ++e) {
          const int m = g + 8 * (e >> 1), n = 2 * t + (e & 1);
          double s = L[l].c[e];
          for (int k = 0; k < kk; ++k) s += A[m][k] * B[k][n];
          L[l].fout[e] = accumulator_round(s);
        }
      }
      break;
    }
    case Op::kLdmatrix: {
      const bool trans = L[0].variant == 1;
      for (int l = 0; l < 32; ++l) {
        if (L[l].addr % 16 || L[l].addr + 16 > smem_size()) die("ldmatrix row address misaligned or out of shared memory", w * 32 + l);
      }
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) {
          // Matrix i: rows from lanes 8i..8i+7, 8 16-bit elements each.
          uint16_t lo, hi;
          if (!trans) {
            const uint32_t row = L[8 * i + l / 4].addr;
            lo = smem16(w, row + 4 * (l % 4));
            hi = smem16(w, row + 4 * (l % 4) + 2);
          } else {
            lo = smem16(w, L[8 * i + 2 * (l % 4)].addr + 2 * (l / 4));
            hi = smem16(w, L[8 * i + 2 * (l % 4) + 1].addr + 2 * (l / 4));
          }
          L[l].out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
      break;
    }
    case Op::kShfl: {
      float v[32];
      for (int l = 0; l < 32; ++l) v[l] = L[l].value;
      for (int l = 0; l < 32; ++l) L[l].fout[0] = v[l ^ int(L[l].addr)];
      break;
    }
    case Op::kBallot: {
      uint32_t mask = 0;
      for (int l = 0; l < 32; ++l) mask |= uint32_t(L[l].pred) << l;
      for (int l = 0; l < 32; ++l) L[l].out[0] = mask;
      break;
    }
    case Op::kSyncwarp:
    case Op::kNone: break;
  }
  for (int l = 0; l < 32; ++l) L[l].op = Op::kNone;
}

inline uint16_t smem16(int, uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, block->smem() + addr, 2);
  return v;
}

inline float half_of(uint32_t r, int i, bool bf16) {
  const uint16_t bits = uint16_t(i ? r >> 16 : r & 0xffffu);
  if (bf16) {
    const uint32_t f = uint32_t(bits) << 16;
    float x;
    std::memcpy(&x, &f, 4);
    return x;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

inline float tf32_of(uint32_t r) {
  const uint32_t bits = r & ~0x1fffu;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// An mma's float32 result: the exact sum rounded to nearest, or toward zero with
// EMU_MMA_ROUND=zero (a model of the tensor cores' truncating accumulation, under
// which a kernel's precision must still hold where it claims to promote its sums).
inline float accumulator_round(double s) {
  static const bool toward_zero = [] {
    const char* v = std::getenv("EMU_MMA_ROUND");
    return v && std::string(v) == "zero";
  }();
  float f = float(s);
  if (toward_zero && std::abs(double(f)) > std::abs(s)) f = std::nextafter(f, 0.f);
  return f;
}

inline uint3 thread_index() { return make_uint3(unsigned(block->thread()), 0, 0); }
inline uint3 block_index() { return make_uint3(block->index(), 0, 0); }

inline void check_dim(dim3 d, const char* what) {
  if (d.y != 1 || d.z != 1) die(what);
}

// Devices (EMU_DEVICES, default 2, so that a test on a second device runs here):
// the current one per host thread, the device of every allocation, and per kernel
// and device the dynamic shared memory it opted in to.
inline int device_count() {
  static const int n = [] {
    const char* v = std::getenv("EMU_DEVICES");
    return v ? std::max(1, std::atoi(v)) : 2;
  }();
  return n;
}
inline thread_local int current_device = 0;
struct Allocation {
  std::size_t bytes;
  int device;
};
inline std::map<uintptr_t, Allocation>& allocations() {
  static std::map<uintptr_t, Allocation> m;
  return m;
}
inline std::map<std::pair<const void*, int>, int>& shared_optins() {
  static std::map<std::pair<const void*, int>, int> m;
  return m;
}
inline thread_local cudaError_t last_error = cudaSuccess;
constexpr std::size_t kDefaultSharedBytes = 48 << 10;

// The device whose allocation holds `address`, or -1.
inline int device_of(uintptr_t address) {
  const auto& m = allocations();
  auto it = m.upper_bound(address);
  if (it == m.begin()) return -1;
  --it;
  return address < it->first + it->second.bytes ? it->second.device : -1;
}
// A kernel reads its tensors through pointers in its parameters: every 8-byte word
// of them that points into an allocation must point into one of the launching
// device (a kernel on device 0 reading device 1's memory faults on a GPU).
template <class A>
void check_devices_of(const A& arg) {
  static_assert(std::is_trivially_copyable_v<std::decay_t<A>>, "kernel parameters are trivially copyable");
  const std::size_t words = sizeof(arg) / sizeof(uintptr_t);
  for (std::size_t i = 0; i < words; ++i) {
    uintptr_t word;
    std::memcpy(&word, reinterpret_cast<const char*>(&arg) + i * sizeof(uintptr_t), sizeof word);
    const int d = device_of(word);
    if (d >= 0 && d != current_device) {
      std::fprintf(stderr, "emulated CUDA: a kernel launched on device %d reads memory allocated on device %d\n",
                   current_device, d);
      std::abort();
    }
  }
}

// The emulated device: an H100 (sm_90, 227 KB of shared memory per block); with
// EMU_DEVICE=a100 an A100 (sm_80, 163 KB), for the paths an sm_80 device takes; with
// EMU_DEVICE=sm120 a GPU newer than every architecture of the build (compute
// capability 12.0), which has no kernel image: launches and cudaFuncGetAttributes
// fail with cudaErrorNoKernelImageForDevice, as an sm_90a-only build's do there.
struct DeviceModel {
  int major, minor, shared_optin;
  bool kernel_image = true;
};
inline const DeviceModel& device_model() {
  static const DeviceModel model = [] {
    const std::string v = std::getenv("EMU_DEVICE") ? std::getenv("EMU_DEVICE") : "";
    if (v == "a100") return DeviceModel{8, 0, 163 << 10};
    if (v == "sm120") return DeviceModel{12, 0, 99 << 10, false};
    return DeviceModel{9, 0, 227 << 10};
  }();
  return model;
}

// Kernel launches of the process so far, and the one (1-based) that is to fail with
// cudaErrorLaunchFailure, running no block (0: none): a test's way to make a launch in
// the middle of a chain fail, as a faulting kernel would.
inline long launches = 0;
inline long failing_launch = 0;

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 dims, std::size_t smem, cudaStream_t, A&&... args) {
  if (++launches == failing_launch) {
    last_error = cudaErrorLaunchFailure;
    return;
  }
  if (!device_model().kernel_image) {
    last_error = cudaErrorNoKernelImageForDevice;
    return;
  }
  check_dim(grid, "only 1-D grids are emulated");
  check_dim(dims, "only 1-D blocks are emulated");
  // Above 48 KB the kernel must have opted in on this device (cudaFuncSetAttribute);
  // below, an attribute set lower than the launch refuses it too (an H100 did, when
  // a kernel set it for a small launch first).
  const auto it = shared_optins().find({reinterpret_cast<const void*>(kernel), current_device});
  const std::size_t limit = it == shared_optins().end() ? kDefaultSharedBytes : std::size_t(it->second);
  if (smem > limit) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  (check_devices_of(args), ...);
  for (unsigned b = 0; b < grid.x; ++b) {
    Block blk(b, grid, dims, smem);
    block = &blk;
    blk.run([&] { kernel(args...); });
    block = nullptr;
  }
}
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 dims, std::size_t smem, int, A&&... args) {
  launch(kernel, grid, dims, smem, cudaStream_t{}, std::forward<A>(args)...);
}

// One counted "device" for cudaMemGetInfo.
inline std::size_t device_bytes = std::size_t(8) << 30;

}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define blockDim (::emu::block->dim())
#define gridDim (::emu::block->grid())

inline void __syncthreads() { emu::block->barrier(); }
// A barrier that also ORs a predicate over the block: each thread reads every
// thread's value between two barriers (no one writes its slot again before both).
inline int __syncthreads_or(int pred) {
  emu::Block* b = emu::block;
  b->lane().pred = pred != 0;
  b->barrier();
  int any = 0;
  for (unsigned t = 0; t < b->dim().x; ++t) any |= int(b->lane_of(int(t)).pred);
  b->barrier();
  return any;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::die("only full-warp __syncwarp is emulated");
  emu::block->lane().op = emu::Op::kSyncwarp;
  emu::block->warp_op();
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) emu::die("only full-warp ballots are emulated");
  emu::Lane& l = emu::block->lane();
  l.op = emu::Op::kBallot;
  l.variant = 0;
  l.pred = pred != 0;
  emu::block->warp_op();
  return emu::block->lane().out[0];
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline float __shfl_xor_sync(unsigned mask, float v, int offset, int width = 32) {
  if (mask != 0xffffffffu || width != 32) emu::die("only full-warp shuffles are emulated");
  emu::Lane& l = emu::block->lane();
  l.op = emu::Op::kShfl;
  l.variant = 0;
  l.value = v;
  l.addr = uint32_t(offset);
  emu::block->warp_op();
  return emu::block->lane().fout[0];
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  emu::allocations()[reinterpret_cast<uintptr_t>(*p)] = {bytes ? bytes : 1, emu::current_device};
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  emu::allocations().erase(reinterpret_cast<uintptr_t>(p));
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2D(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                                std::size_t height, cudaMemcpyKind) {
  for (std::size_t r = 0; r < height; ++r)
    std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = emu::device_count();
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= emu::device_count()) return cudaErrorInvalidDevice;
  emu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  std::memset(prop, 0, sizeof *prop);
  prop->major = emu::device_model().major;
  prop->minor = emu::device_model().minor;
  prop->multiProcessorCount = 132;
  prop->sharedMemPerBlockOptin = emu::device_model().shared_optin;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const emu::DeviceModel& d = emu::device_model();
  *value = attr == cudaDevAttrComputeCapabilityMajor         ? d.major
           : attr == cudaDevAttrComputeCapabilityMinor       ? d.minor
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? d.shared_optin
                                                             : 0;
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  *free_bytes = *total_bytes = emu::device_bytes;
  return cudaSuccess;
}
namespace emu {
// cuTensorMapEncodeTiled's checks (the ones the driver documents for tiled maps),
// then the map's fields into the TensorMapModel the emulated copies read.
inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t dims, void* base,
                             const cuuint64_t* extent, const cuuint64_t* stride, const cuuint32_t* box,
                             const cuuint32_t* element_stride, CUtensorMapInterleave interleave,
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  const int element_bytes = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4
                            : type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2
                                                                                                                 : 0;
  if (!element_bytes || dims < 1 || dims > 5 || reinterpret_cast<uintptr_t>(base) % 16 ||
      interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B))
    return CUDA_ERROR_INVALID_VALUE;
  TensorMapModel m{};
  m.base = static_cast<const unsigned char*>(base);
  m.dims = uint8_t(dims);
  m.element_bytes = uint8_t(element_bytes);
  m.swizzle_128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  for (cuuint32_t i = 0; i < dims; ++i) {
    if (extent[i] == 0 || extent[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256 || element_stride[i] == 0 ||
        element_stride[i] > 8)
      return CUDA_ERROR_INVALID_VALUE;
    if (i > 0 && (stride[i - 1] % 16 || stride[i - 1] >= (uint64_t(1) << 40))) return CUDA_ERROR_INVALID_VALUE;
    m.extent[i] = extent[i];
    m.box[i] = box[i];
    m.element_stride[i] = element_stride[i];
    if (i > 0) m.stride[i - 1] = stride[i - 1];
  }
  if ((box[0] * element_bytes) % 16 || (m.swizzle_128 && box[0] * element_bytes > 128)) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof *map);
  std::memcpy(map, &m, sizeof m);
  return CUDA_SUCCESS;
}
}  // namespace emu

inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* status) {
  const bool known = std::string(symbol) == "cuTensorMapEncodeTiled";
  *fn = known ? reinterpret_cast<void*>(&emu::encode_tiled) : nullptr;
  if (status) *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

template <class F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int value) {
  if (value > emu::device_model().shared_optin) return cudaErrorInvalidValue;
  emu::shared_optins()[{reinterpret_cast<const void*>(kernel), emu::current_device}] = value;
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, F) {
  std::memset(attributes, 0, sizeof *attributes);
  return emu::device_model().kernel_image ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}
