// SPDX-License-Identifier: Apache-2.0
#include "timing.hpp"

#include <algorithm>
#include <chrono>
#include <memory>

#include "device.hpp"

#if NBHD_BENCH_CUDA
#include <cuda_runtime.h>
#endif

namespace nbhd::bench {

int default_warmup(Device device) { return device == Device::kCUDA ? 10 : 1; }
int default_iters(Device device) { return device == Device::kCUDA ? 30 : 5; }

Timings summarize(std::vector<double> ms) {
  Timings t;
  t.ms = ms;
  if (ms.empty()) return t;
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  t.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  t.min_ms = ms.front();
  t.max_ms = ms.back();
  return t;
}

namespace {

Status time_on_cpu(int warmup, int iters, const std::function<Status()>& step, Timings* out) {
  using Clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) NBHD_RETURN_IF_ERROR(step());
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto start = Clock::now();
    NBHD_RETURN_IF_ERROR(step());
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  *out = summarize(std::move(ms));
  return Status::Ok();
}

#if NBHD_BENCH_CUDA
Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status(StatusCode::kDeviceError, std::string(what) + ": " + cudaGetErrorString(err));
}
#define BENCH_CUDA(expr) NBHD_RETURN_IF_ERROR(cuda_status((expr), #expr))

// Events created for the timed loop, destroyed on every path out of it.
struct EventPairs {
  std::vector<cudaEvent_t> start, stop;
  ~EventPairs() {
    for (cudaEvent_t e : start) cudaEventDestroy(e);
    for (cudaEvent_t e : stop) cudaEventDestroy(e);
  }
  Status create(int n) {
    for (int i = 0; i < n; ++i) {
      start.push_back(nullptr);
      BENCH_CUDA(cudaEventCreate(&start.back()));
      stop.push_back(nullptr);
      BENCH_CUDA(cudaEventCreate(&stop.back()));
    }
    return Status::Ok();
  }
};

Status time_on_gpu(void* stream_ptr, int warmup, int iters, const std::function<Status()>& step, Timings* out) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // Writing twice the L2 size evicts whatever the previous iteration left there.
  Buffer flush;
  const size_t flush_bytes = std::max<size_t>(2 * l2_cache_bytes(Device::kCUDA), size_t(1) << 20);
  NBHD_RETURN_IF_ERROR(Buffer::allocate(Device::kCUDA, flush_bytes, &flush));
  EventPairs events;
  NBHD_RETURN_IF_ERROR(events.create(iters));

  for (int i = 0; i < warmup; ++i) NBHD_RETURN_IF_ERROR(step());
  for (int i = 0; i < iters; ++i) {
    NBHD_RETURN_IF_ERROR(flush.fill_bytes(static_cast<unsigned char>(i), stream));
    BENCH_CUDA(cudaEventRecord(events.start[i], stream));
    NBHD_RETURN_IF_ERROR(step());
    BENCH_CUDA(cudaEventRecord(events.stop[i], stream));
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> ms(iters);
  for (int i = 0; i < iters; ++i) {
    float elapsed = 0;
    BENCH_CUDA(cudaEventElapsedTime(&elapsed, events.start[i], events.stop[i]));
    ms[i] = elapsed;
  }
  *out = summarize(std::move(ms));
  return Status::Ok();
}
#endif

}  // namespace

Status time_steps(Device device, void* stream, int warmup, int iters, const std::function<Status()>& step,
                  Timings* out) {
  if (device == Device::kCPU) return time_on_cpu(warmup, iters, step, out);
#if NBHD_BENCH_CUDA
  return time_on_gpu(stream, warmup, iters, step, out);
#else
  (void)stream;
  return unsupported("timing on a GPU needs nbhd-bench built with the CUDA runtime");
#endif
}

}  // namespace nbhd::bench
