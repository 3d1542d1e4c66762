// SPDX-License-Identifier: Apache-2.0
// What a backend provides to the dispatcher. Each backend defines one BackendImpl;
// the registry lists those compiled in, in order of preference for Backend::kAuto.
#pragma once

#include <string>
#include <vector>

#include "core/tensor_checks.hpp"
#include "nbhd/api.hpp"

namespace nbhd::detail {

enum class Pass { kForward, kBackward, kUnfused };

struct UnfusedImpl {
  Status (*qk)(const Problem&, const QkTensors&, const Options&);
  Status (*qk_backward)(const Problem&, const QkBackwardTensors&, const Options&);
  Status (*softmax)(const Problem&, const SoftmaxTensors&, const Options&);
  Status (*softmax_backward)(const Problem&, const SoftmaxBackwardTensors&, const Options&);
  Status (*av)(const Problem&, const AvTensors&, const Options&);
  Status (*av_backward)(const Problem&, const AvBackwardTensors&, const Options&);
};

struct BackendImpl {
  Backend id;
  Device device;
  // Ok, or why this backend cannot run the (already validated) problem.
  Status (*supports)(const Problem&, Pass);
  Status (*forward)(const Problem&, const ForwardTensors&, const Options&);    // may be null
  Status (*backward)(const Problem&, const BackwardTensors&, const Options&);  // may be null
  const UnfusedImpl* unfused;                                                  // may be null
  // Tiles queries per dilation group: run problems with short groups unfolded
  // (core/unfold.hpp).
  bool unfolds_short_groups = false;
  // Runs periodic axes (the dispatcher passes over a backend that does not).
  bool runs_periodic = false;
  // Ok, or why this backend cannot take these tensors (layout, alignment, or their
  // GPU when it is not the current one); run after supports() when the call has
  // tensors, so that `auto` passes over a backend the tensors do not suit. May be
  // null: every layout and device is fine.
  Status (*supports_tensors)(const Problem&, Pass, const std::vector<TensorRule>&) = nullptr;
};

const std::vector<const BackendImpl*>& registry();

// The refusal of a backend that computes every query of the grid, for a problem with
// a query sub-box (Problem::query_begin / query_end); Ok without one.
inline Status refuse_query_box(const Problem& p, const char* backend) {
  if (!p.has_query_box()) return Status::Ok();
  return unsupported(std::string("query sub-box: not implemented in backend ") + backend +
                     " yet (reference, cpu and naive run it)");
}

}  // namespace nbhd::detail
