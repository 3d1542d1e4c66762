// SPDX-License-Identifier: Apache-2.0
// The reference backend: plain loops, float64 accumulation. The oracle every other
// backend is tested against, so it favours being obviously right over being fast.
#pragma once

#include "nbhd/api.hpp"

namespace nbhd::cpu {

// How the plain mode forms a product of two elements: exactly (then rounded as it
// is accumulated), or as a float32 kernel on tensor cores does, from three tf32
// products hi*hi + hi*lo + lo*hi with x = hi + lo, hi = tf32(x), lo = tf32(x - hi)
// (common/mma.cuh): the "same math done plainly" for such a kernel.
enum class PlainProducts { kExact, kTf32x3 };
// x * y as PlainProducts::kTf32x3 forms it (x and y float32 values), each product exact.
double tf32x3_product(double x, double y);

// With `plain_low_precision`, scores and probabilities are rounded to the problem's
// dtype as a plain implementation in that dtype would round them (scores and
// probabilities stored in the dtype, products accumulated in float32). Its error
// against the float64 result is the baseline of the flash-attention tolerance rule.
Status reference_forward(const Problem&, const ForwardTensors&, bool plain_low_precision,
                         PlainProducts products = PlainProducts::kExact);
Status reference_backward(const Problem&, const BackwardTensors&);

Status reference_qk(const Problem&, const QkTensors&);
Status reference_qk_backward(const Problem&, const QkBackwardTensors&);
Status reference_softmax(const Problem&, const SoftmaxTensors&);
Status reference_softmax_backward(const Problem&, const SoftmaxBackwardTensors&);
Status reference_av(const Problem&, const AvTensors&);
Status reference_av_backward(const Problem&, const AvBackwardTensors&);

}  // namespace nbhd::cpu
