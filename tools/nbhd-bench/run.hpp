// SPDX-License-Identifier: Apache-2.0
// One benchmark run: allocate the workload on the chosen device, time the pass,
// and (with --verify) check the last timed iteration's results.
#pragma once

#include <optional>

#include "args.hpp"
#include "backends.hpp"
#include "timing.hpp"
#include "verify.hpp"

namespace nbhd::bench {

struct Outcome {
  int warmup = 0, iters = 0;
  Timings timings;
  std::optional<Verification> verification;
};

Status run_benchmark(const Args& args, const Choice& choice, Outcome* out);

// The device's copy bandwidth in GB/s, read + write (--sol-gbps measure): the median
// of timed copies between two buffers of max(1 GiB, 4x L2) on a GPU, 256 MiB on the CPU.
Status measure_copy_gbps(Device device, double* gbps);

}  // namespace nbhd::bench
