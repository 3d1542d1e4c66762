// SPDX-License-Identifier: Apache-2.0
// The tensors of one problem on one device: seeded random normal inputs (never
// zeros), outputs pre-filled with NaN (so a backend that skips an element fails
// --verify), and the gradients' tensors for backward passes.
#pragma once

#include <cstdint>
#include <vector>

#include "device.hpp"
#include "nbhd/api.hpp"

namespace nbhd::bench {

struct Workload {
  Tensor q, k, v, rpb, additional_keys, additional_values;  // inputs
  Tensor out, lse;                                          // forward outputs
  Tensor d_out;                                             // backward input
  Tensor d_q, d_k, d_v, d_rpb, d_additional_keys, d_additional_values;  // backward outputs

  // Allocates and fills every tensor the problem needs; the backward's only when
  // `with_backward`.
  static Status create(const Problem& p, Device device, bool with_backward, uint64_t seed, Workload* out);

  ForwardTensors forward_tensors() const;
  BackwardTensors backward_tensors() const;

  // Host copies of every tensor.
  Status to_host(Workload* out) const;
};

// Element values of a host tensor in row-major logical order (strides honoured).
std::vector<double> values(const TensorRef& t);
// Element i (row-major logical index) of a host tensor.
double value_at(const TensorRef& t, int64_t i);
// Sets element i of a host tensor, rounded to its dtype.
void set_value_at(const TensorRef& t, int64_t i, double v);

}  // namespace nbhd::bench
