// SPDX-License-Identifier: Apache-2.0
#include "backends.hpp"

#include <cstdio>

#include "core/unfold.hpp"
#include "device.hpp"

#if NBHD_BENCH_FUSED
#include "cuda/fused/backward_plan.hpp"
#include "cuda/fused/host.hpp"  // the fused backend's planners, compiled into nbhd with the backend
#endif

namespace nbhd::bench {
namespace {

// Whether `device` exists on this machine; why not when it does not.
bool present(Device device, std::string* why_not) {
  return device == Device::kCPU || gpu_available(why_not);
}

std::string built_list() {
  std::string s;
  for (const BackendInfo& b : built_backends()) s += (s.empty() ? "" : ", ") + std::string(name(b.backend));
  return s;
}

}  // namespace

Status choose_backend(const Problem& p, Backend requested, Choice* out) {
  std::string reasons;
  for (const BackendInfo& b : built_backends()) {
    if (requested != Backend::kAuto && b.backend != requested) continue;
    std::string why_not;
    Status ok = b.fused_ops ? Status::Ok() : unsupported("it implements only the unfused operations");
    if (ok.ok() && !present(b.device, &why_not)) ok = unsupported("it runs on " + std::string(name(b.device)) + ": " + why_not);
    if (ok.ok()) ok = can_run(b.backend, p, b.device);
    if (ok.ok()) {
      *out = {requested, b.backend, b.device};
      return Status::Ok();
    }
    if (requested != Backend::kAuto) return ok;
    reasons += "\n  " + std::string(name(b.backend)) + ": " + ok.message();
  }
  if (requested != Backend::kAuto)
    return unsupported("backend '" + std::string(name(requested)) + "' is not built into this library (built: " +
                       built_list() + ")");
  return unsupported("no built backend can run " + p.to_string() + " here:" + reasons);
}

// Every tile configuration of the problem's rank and head dim, ranked, the chosen one
// first (the fused backend's planners: forward, then the backward's key and dq
// passes); nothing for the other backends.
std::vector<std::string> plan_lines(const Problem& p, Backend backend) {
#if NBHD_BENCH_FUSED
  if (backend == Backend::kFused) {
    const bool hopper = cuda::fused::hopper_device();
    std::vector<std::string> lines = cuda::fused::describe_plan(p, hopper);
    for (const std::string& line : cuda::fused::describe_backward_plan(p, hopper)) lines.push_back(line);
    return lines;
  }
#endif
  (void)p;
  (void)backend;
  return {};
}

std::vector<std::string> candidate_lines(const Problem& p, const BackendInfo& b) {
  if (!b.unfolds_short_groups) return plan_lines(p, b.backend);
  // The dispatcher runs short dilation groups as the parts of core/unfold.hpp.
  const std::vector<detail::UnfoldedPart> parts = detail::unfold_short_groups(p, /*single_part_only=*/false);
  if (parts.empty()) return plan_lines(p, b.backend);
  std::vector<std::string> lines = {"forward runs unfolded (dilation groups under " +
                                    std::to_string(detail::kShortGroup) + " tokens) in " +
                                    std::to_string(parts.size()) + (parts.size() == 1 ? " part:" : " parts:")};
  for (const detail::UnfoldedPart& part : parts) {
    lines.push_back("part " + part.problem.to_string());
    for (const std::string& line : plan_lines(part.problem, b.backend)) lines.push_back("  " + line);
  }
  return lines;
}

void print_dry_run(const Problem& p, std::ostream& os) {
  char line[256];
  os << "problem  " << p.to_string() << "\n";
  const double pairs = double(p.attended_pairs());
  std::snprintf(line, sizeof line, "work     %.0f attended pairs (%.1f keys per query), forward %.4g GFLOP, %.4g MB\n",
                pairs, pairs / double(p.query_tokens()), p.forward_flops() * 1e-9, p.forward_bytes() * 1e-6);
  os << line;
  std::string why_not;
  os << "gpu      " << (gpu_available(&why_not) ? device_name(Device::kCUDA) : "none (" + why_not + ")") << "\n";
  os << "backends (best first; forward on this problem):\n";
  for (const BackendInfo& b : built_backends()) {
    std::snprintf(line, sizeof line, "  %-10s %-5s ", name(b.backend), name(b.device));
    os << line;
    std::string absent;
    const Status s = can_run(b.backend, p, b.device);
    if (!b.fused_ops)
      os << "unfused operations only\n";
    else if (!s.ok())
      os << "cannot run: " << s.message() << "\n";
    else if (!present(b.device, &absent))
      os << "can run, but not here: " << absent << "\n";
    else
      os << "can run\n";
    for (const std::string& extra : candidate_lines(p, b)) os << "      " << extra << "\n";
  }
  Choice choice;
  const Status s = choose_backend(p, Backend::kAuto, &choice);
  os << "auto     " << (s.ok() ? std::string(name(choice.backend)) + " on " + name(choice.device) : s.message()) << "\n";
}

}  // namespace nbhd::bench
