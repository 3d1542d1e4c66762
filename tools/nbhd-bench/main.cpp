// SPDX-License-Identifier: Apache-2.0
// nbhd-bench: runs one neighborhood attention problem from the command line, times
// it, verifies it against the reference backend, and reports TFLOP/s over attended
// pairs. `nbhd-bench --help` lists the flags; exit status 0 ok, 1 verification
// failed, 2 bad arguments or unsupported problem, 3 runtime error.
#include <exception>
#include <fstream>
#include <iostream>

#include "args.hpp"
#include "backends.hpp"
#include "device.hpp"
#include "report.hpp"
#include "run.hpp"

namespace {

using namespace nbhd;
using namespace nbhd::bench;

constexpr int kExitVerifyFailed = 1, kExitUsage = 2, kExitRuntime = 3;

int fail(const Status& s) {
  std::cerr << "nbhd-bench: error: " << s.message() << "\n";
  const bool usage = s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kTypeMismatch ||
                     s.code() == StatusCode::kUnsupported;
  return usage ? kExitUsage : kExitRuntime;
}

int run(int argc, char** argv) {
  Args args;
  if (Status s = parse_args(argc, argv, &args); !s.ok()) return fail(s);
  if (args.help) {
    std::cout << usage();
    return 0;
  }
  if (Status s = args.problem.validate(); !s.ok()) return fail(s);
  if (args.dry_run) {
    print_dry_run(args.problem, std::cout);
    return 0;
  }
  Choice choice;
  if (Status s = choose_backend(args.problem, args.backend, &choice); !s.ok()) return fail(s);
  int64_t slices = 0;
  if (args.verify)
    if (Status s = plan_verification(args.problem, args.pass, &slices); !s.ok()) return fail(s);

  if (args.measure_gbps) {
    double gbps = 0;
    if (Status s = measure_copy_gbps(choice.device, &gbps); !s.ok()) return fail(s);
    args.sol_gbps = gbps;
  }
  Outcome outcome;
  if (Status s = run_benchmark(args, choice, &outcome); !s.ok()) return fail(s);
  Report report{args, choice, device_name(choice.device), outcome.warmup, outcome.iters, outcome.timings,
                compute_metrics(args, outcome.timings), outcome.verification};

  // JSON on stdout moves the text to stderr, so the JSON can be piped.
  const bool json_stdout = args.json && (args.json_file.empty() || args.json_file == "-");
  print_text(report, json_stdout ? std::cerr : std::cout);
  if (json_stdout) std::cout << to_json(report) << "\n";
  if (args.json && !json_stdout) {
    std::ofstream file(args.json_file);
    if (!(file << to_json(report) << "\n"))
      return fail(Status(StatusCode::kInternal, "could not write " + args.json_file));
  }
  return report.verification && !report.verification->pass() ? kExitVerifyFailed : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "nbhd-bench: error: " << e.what() << "\n";
    return kExitRuntime;
  }
}
