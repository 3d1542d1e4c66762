// SPDX-License-Identifier: Apache-2.0
// What a run reports: work counted over attended pairs only (spec "Counting work"),
// rates from the median time, % of speed of light, verification; as text or JSON.
#pragma once

#include <optional>
#include <ostream>
#include <string>

#include "args.hpp"
#include "backends.hpp"
#include "timing.hpp"
#include "verify.hpp"

namespace nbhd::bench {

// FLOPs of a pass: the forward's count, backward 2.5x, forward+backward 3.5x.
double pass_flops(const Problem& p, Pass pass);
// Bytes a pass must move at least: each of its inputs read once, each output
// written once (the backward reads q, k, v, out, lse, d_out and writes dq, dk, dv).
double pass_bytes(const Problem& p, Pass pass);

struct Metrics {
  double flops = 0, bytes = 0;
  double tflops = 0, gbps = 0;        // at the median time
  std::optional<double> sol_ms;       // max(flops / sol_tflops, bytes / sol_gbps)
  std::optional<double> sol_fraction; // sol_ms / median
};

Metrics compute_metrics(const Args& args, const Timings& t);

struct Report {
  const Args& args;
  Choice choice;
  std::string device_name;
  int warmup = 0, iters = 0;
  Timings timings;
  Metrics metrics;
  std::optional<Verification> verification;
};

void print_text(const Report& r, std::ostream& os);
std::string to_json(const Report& r);

}  // namespace nbhd::bench
