// SPDX-License-Identifier: Apache-2.0
// nbhd-bench's command line: flags -> Args. Parsing never throws and never exits;
// a bad flag comes back as a Status whose message names the flag and the value.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "nbhd/api.hpp"

namespace nbhd::bench {

// What to time: the forward, the backward (after one untimed forward for out and
// lse), or both back to back in one timed step.
enum class Pass { kForward, kBackward, kForwardBackward };

const char* name(Pass p);

struct Args {
  Problem problem;           // validated separately (Problem::validate)
  Backend backend = Backend::kAuto;
  Pass pass = Pass::kForward;
  bool verify = false;
  bool dry_run = false;
  bool deterministic = false;
  bool help = false;
  bool json = false;
  std::string json_file;     // empty or "-": stdout
  int warmup = -1;           // -1: the device's default (timing.hpp)
  int iters = -1;
  uint64_t seed = 0;
  int threads = 0;           // CPU backends; 0 = all hardware threads
  std::optional<double> sol_tflops;
  std::optional<double> sol_gbps;
  bool measure_gbps = false; // --sol-gbps measure: sol_gbps is the copy bandwidth measured first
};

// Parses argv[1..argc). Flags take their value as the next argument or after '='
// (--heads 4, --heads=4). --json takes an optional FILE (a next argument that does
// not start with "--").
Status parse_args(int argc, const char* const* argv, Args* out);

// Per-axis values: "56x56" -> {56, 56}; a single number is repeated `rank` times.
// The count must be 1 or `rank`.
Status parse_axes(const std::string& flag, const std::string& text, int rank, std::array<int64_t, 3>* out);

std::string usage();

}  // namespace nbhd::bench
