// SPDX-License-Identifier: Apache-2.0
// --verify: the backend's results against the reference backend, on host copies.
//
// The work is split into (batch, kv-head) slices: a slice is the problem with batch 1
// and the kv head's group of query heads, which is exactly independent of the other
// slices (also for dk/dv, which sum over the group's query heads). A seeded sample of
// slices is checked, as many as fit a budget of reference work; a problem whose
// single slice is over the budget is refused before anything runs.
//
// Forward (out, lse): the flash-attention rule,
//   max|got - exact| <= 2 * max|plain - exact| + 2 * noise,
// exact = the reference in float64 on the inputs as stored, plain = the reference
// run as a plain implementation in the problem's dtype (cpu::reference_forward with
// plain_low_precision; for float32 on the tensor-core backends, fused and gemm, with
// their three tf32 products per product: cpu::PlainProducts::kTf32x3), noise =
// max|round_dtype(exact + 0.3) - (exact + 0.3)|.
// Backward (dq, dk, dv, and the additional tokens' gradients): no plain backward
// exists in the reference, so a stated relative bound per dtype (see verify.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "args.hpp"
#include "workload.hpp"

namespace nbhd::bench {

struct Check {
  std::string tensor;  // "out", "lse", "dq", ...
  double err = 0;      // max |got - exact|
  double bound = 0;    // what err must not exceed
  std::string rule;    // how the bound was made
  bool finite = true;  // every checked element of got is finite
  bool ok() const { return finite && err <= bound; }
};

struct Verification {
  std::vector<Check> checks;
  int64_t slices_checked = 0, slices_total = 0;
  std::vector<std::string> notes;  // what was not checked, and why
  bool pass() const;
  // The check closest to (or furthest past) its bound.
  const Check* worst() const;
};

// How many slices --verify will check; an error when even one is over budget.
Status plan_verification(const Problem& p, Pass pass, int64_t* slices);

// Whether `backend` (what ran the forward) forms float32 products from three tf32
// ones, and the plain baseline must do the same.
bool tf32x3_products(const Problem& p, Backend backend);

// `host` holds host copies of the tensors after the timed run.
Status verify(const Problem& p, Pass pass, const Workload& host, uint64_t seed, bool tf32x3, Verification* out);

}  // namespace nbhd::bench
