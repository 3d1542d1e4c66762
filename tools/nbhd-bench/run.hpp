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

}  // namespace nbhd::bench
