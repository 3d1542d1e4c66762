// SPDX-License-Identifier: Apache-2.0
// Test utilities: host tensors of any dtype and layout, seeded random problems, a
// dense-mask attention oracle (built on spec_oracle.hpp, not on the library's
// window code) and the flash-attention tolerance rule.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nbhd/api.hpp"
#include "spec_oracle.hpp"

namespace nbhd::testing {

// Owns host memory for a TensorRef. With `gap` > 0 every dimension but the last is
// padded by `gap` elements, so strides are not the packed ones.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<int64_t> shape, int64_t gap = 0) : shape_(std::move(shape)) {
    ref_.dtype = dtype;
    ref_.ndim = int(shape_.size());
    int64_t stride = 1;
    for (int d = ref_.ndim - 1; d >= 0; --d) {
      ref_.shape[d] = shape_[d];
      ref_.stride[d] = stride;
      stride *= shape_[d] + (d == ref_.ndim - 1 ? 0 : gap);
    }
    if (ref_.ndim > 0 && gap > 0) stride += gap;
    storage_.assign(size_t(std::max<int64_t>(stride, 1)) * size_of(dtype), 0);
    ref_.data = storage_.data();
  }

  const TensorRef& ref() const { return ref_; }
  // The whole allocation (padding included), for copies to and from a device.
  void* storage() { return storage_.data(); }
  const void* storage() const { return storage_.data(); }
  size_t storage_bytes() const { return storage_.size(); }
  int64_t numel() const { return ref_.numel(); }

  // Element at logical (row-major) position i.
  int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (int d = ref_.ndim - 1; d >= 0; --d) {
      off += (i % shape_[d]) * ref_.stride[d];
      i /= shape_[d];
    }
    return off;
  }
  double get(int64_t i) const;
  void set(int64_t i, double v);
  void fill_random(std::mt19937_64& rng, double scale = 1.0);
  std::vector<double> values() const {
    std::vector<double> v(numel());
    for (int64_t i = 0; i < numel(); ++i) v[i] = get(i);
    return v;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<unsigned char> storage_;
  TensorRef ref_;
};

struct RandomOptions {
  int rank = 2;
  DType dtype = DType::kFloat64;
  int max_extent = 0;  // 0: a default per rank
  bool allow_additional = true;
  bool allow_rpb = true;
  bool allow_periodic = false;  // draws periodic (non-causal) axes (the backends that run them)
};

Problem random_problem(std::mt19937_64& rng, const RandomOptions& o);

// p with a random query sub-box: per axis a random [begin, end), sometimes the whole
// axis, sometimes with end left 0 (the extent).
Problem with_random_box(Problem p, std::mt19937_64& rng);

// Inputs of a problem, random, with padded strides when `gap` > 0; the query has the
// query sub-box's shape.
struct Inputs {
  HostTensor q, k, v, rpb, ak, av;
  Inputs(const Problem& p, std::mt19937_64& rng, int64_t gap = 0);
};

struct DenseResult {
  std::vector<double> out, lse, dq, dk, dv, drpb, dak, dav;
};

// Attention with a dense N x N mask from the spec oracle, in float64 on the values
// of `in` (as stored, i.e. after rounding to their dtype). With d_out, gradients too;
// with d_lse as well, of a loss that uses lse too (each score's gradient gains P d_lse).
DenseResult dense_attention(const Problem& p, const Inputs& in, const HostTensor* d_out = nullptr,
                            const HostTensor* d_lse = nullptr);

// The flash-attention tolerance rule: the error of `got` against the exact `ref`
// must be at most twice the error of a plain implementation in the same precision
// (`plain`) plus twice the dtype's rounding noise at the output's scale, plus twice
// `extra_noise` (a caller's other rounding noise, e.g. of float32 sums' order).
void expect_close(const std::string& what, DType dtype, const std::vector<double>& got,
                  const std::vector<double>& ref, const std::vector<double>& plain, double extra_noise = 0);
// Fixed absolute + relative bound, for float64 and for cases with no plain baseline.
void expect_near(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                 double atol, double rtol = 0);

}  // namespace nbhd::testing
