// SPDX-License-Identifier: Apache-2.0
// Timing one step (a forward, a backward, or both) over warm-up and timed
// iterations. CUDA: one cudaEvent pair per iteration on the run's stream, with the
// L2 cache flushed between iterations (a write over twice its size) so no timed
// iteration reads inputs the previous one left in L2. CPU: std::chrono::steady_clock.
#pragma once

#include <functional>
#include <vector>

#include "nbhd/api.hpp"

namespace nbhd::bench {

struct Timings {
  std::vector<double> ms;  // one per timed iteration, in order
  double median_ms = 0, min_ms = 0, max_ms = 0;
};

// Defaults when --warmup / --iters are not given: a GPU step takes micro- to
// milliseconds, a CPU step up to seconds.
int default_warmup(Device device);
int default_iters(Device device);

// Runs `step` `warmup` times, then `iters` timed times. `step` enqueues its work on
// `stream` (CUDA) or runs it (CPU); its first error stops the loop.
Status time_steps(Device device, void* stream, int warmup, int iters, const std::function<Status()>& step,
                  Timings* out);

// Median (mean of the middle two for an even count), min and max of `ms`.
Timings summarize(std::vector<double> ms);

}  // namespace nbhd::bench
