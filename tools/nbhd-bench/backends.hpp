// SPDX-License-Identifier: Apache-2.0
// Which built backend runs a problem, on which device; and --dry-run's listing of
// every built backend with the reason it can or cannot run the problem.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "nbhd/api.hpp"

namespace nbhd::bench {

struct Choice {
  Backend requested = Backend::kAuto;  // what the library is asked for
  Backend backend = Backend::kAuto;    // what that resolves to for the forward
  Device device = Device::kCPU;        // where the tensors go
};

// --backend auto: the first built backend (best first) that can run the problem on
// a device present here; a named backend: that one, if built, its device present,
// and it can run the problem.
Status choose_backend(const Problem& p, Backend requested, Choice* out);

// Extra --dry-run lines a backend contributes about `p`: the parts it runs where
// short dilation groups are unfolded (docs/design.md), and the fused backend's tile
// configurations of each, ranked by its planner (chosen first, then each rejected one
// with its cost), when nbhd-bench is built with that backend (NBHD_BENCH_FUSED).
std::vector<std::string> candidate_lines(const Problem& p, const BackendInfo& backend);

void print_dry_run(const Problem& p, std::ostream& os);

}  // namespace nbhd::bench
