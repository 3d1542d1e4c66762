// SPDX-License-Identifier: Apache-2.0
// Bad input: every rule of Problem::validate and of the tensor checks gives an
// error that names the argument (and axis), never a crash.
#include <gtest/gtest.h>

#include "testing.hpp"

namespace nbhd {
namespace {

using testing::HostTensor;

Problem good() {
  Problem p;
  p.rank = 2;
  p.extent = {16, 12, 0};
  p.kernel = {5, 3, 0};
  p.dilation = {2, 1, 1};
  p.stride = {1, 3, 1};
  p.batch = 2;
  p.heads = 4;
  p.kv_heads = 2;
  p.dim = 8;
  return p;
}

void expect_error(const Problem& p, StatusCode code, std::initializer_list<const char*> words) {
  const Status s = p.validate();
  ASSERT_FALSE(s.ok()) << p.to_string();
  EXPECT_EQ(s.code(), code);
  for (const char* w : words) EXPECT_NE(s.message().find(w), std::string::npos) << "'" << w << "' not in: " << s.message();
}

TEST(Validate, GoodProblemPasses) { EXPECT_TRUE(good().validate().ok()) << good().validate().message(); }

TEST(Validate, EveryRuleNamesItsArgumentAndAxis) {
  Problem p = good();
  p.rank = 4;
  expect_error(p, StatusCode::kInvalidArgument, {"rank", "4"});
  p = good(), p.batch = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"batch", ">= 1"});
  p = good(), p.heads = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"heads"});
  p = good(), p.kv_heads = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"kv_heads"});
  p = good(), p.heads = 5;
  expect_error(p, StatusCode::kInvalidArgument, {"heads = 5", "multiple of kv_heads = 2"});
  p = good(), p.dim = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"dim"});
  p = good(), p.dim_v = -1;
  expect_error(p, StatusCode::kInvalidArgument, {"dim_v"});
  p = good(), p.additional_tokens = -2;
  expect_error(p, StatusCode::kInvalidArgument, {"additional_tokens"});
  p = good(), p.scale = std::numeric_limits<double>::infinity();
  expect_error(p, StatusCode::kInvalidArgument, {"scale"});
  p = good(), p.extent[1] = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"extent[axis 1] = 0"});
  p = good(), p.kernel[1] = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"kernel_size[axis 1] = 0", ">= 1"});
  p = good(), p.dilation[0] = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"dilation[axis 0] = 0"});
  p = good(), p.kernel[0] = 9;  // 9 * 2 > 16
  expect_error(p, StatusCode::kInvalidArgument, {"kernel_size[axis 0] = 9", "dilation[axis 0] = 2", "18", "16"});
  p = good(), p.kernel[1] = 13;
  expect_error(p, StatusCode::kInvalidArgument, {"kernel_size[axis 1] = 13", "12"});
  p = good(), p.stride[1] = 4;
  expect_error(p, StatusCode::kInvalidArgument, {"stride[axis 1] = 4", "kernel_size = 3"});
  p = good(), p.stride[0] = 0;
  expect_error(p, StatusCode::kInvalidArgument, {"stride[axis 0] = 0"});
  p = good(), p.periodic[1] = true, p.causal[1] = true;
  expect_error(p, StatusCode::kInvalidArgument, {"periodic[axis 1]", "causal[axis 1]", "not both"});
  p = good(), p.periodic[0] = true, p.kernel[0] = 9;  // the length rule holds on periodic axes too
  expect_error(p, StatusCode::kInvalidArgument, {"kernel_size[axis 0] = 9", "dilation[axis 0] = 2", "16"});
}

TEST(Validate, HugeProblemsAreRejectedNotOverflowed) {
  Problem p = good();
  p.batch = int64_t(1) << 40;
  p.extent = {int64_t(1) << 20, 12, 0};
  expect_error(p, StatusCode::kInvalidArgument, {"overflows 64 bits"});
  p = good();
  p.extent[0] = int64_t(1) << 32;
  expect_error(p, StatusCode::kInvalidArgument, {"extent[axis 0]"});
}

// Sizes whose products overflow 64 bits are refused, with every product checked
// before it is formed: the widest tensor's heads x head dim, and the relative
// positional bias's heads x (2 kernel - 1) per axis (here 2^65 bias entries over a
// grid of 2^62 tokens, which fits).
TEST(Validate, HugeProductsAreRejectedBeforeTheyOverflow) {
  Problem p = good();
  p.dim = int64_t(1) << 62;  // x 4 heads: 2^64
  expect_error(p, StatusCode::kInvalidArgument, {"more than 2^63 elements"});
  p = good();
  p.rank = 3;
  p.extent = {int64_t(1) << 21, int64_t(1) << 21, int64_t(1) << 20};
  p.kernel = p.extent;
  p.dilation = {1, 1, 1};
  p.stride = {1, 1, 1};
  p.batch = 1;
  p.heads = p.kv_heads = 1;
  p.dim = 1;
  p.has_rpb = true;
  expect_error(p, StatusCode::kInvalidArgument, {"more than 2^63 elements"});
}

// A problem whose tensors hold more than 2^31 elements is valid: sizes are 64-bit.
TEST(Validate, MoreThan2To31ElementsIsValid) {
  Problem p = good();
  p.batch = 1 << 12;
  p.extent = {256, 256, 0};
  p.heads = 8;
  p.dim = 128;
  EXPECT_TRUE(p.validate().ok());
  EXPECT_GT(double(p.batch) * p.tokens() * p.heads * p.dim, 2147483648.0);
}

struct Tensors {
  Problem p = good();
  HostTensor q{DType::kFloat32, {2, 16, 12, 4, 8}}, k{DType::kFloat32, {2, 16, 12, 2, 8}},
      v{DType::kFloat32, {2, 16, 12, 2, 8}}, out{DType::kFloat32, {2, 16, 12, 4, 8}};
  ForwardTensors t() const {
    ForwardTensors f;
    f.query = q.ref();
    f.key = k.ref();
    f.value = v.ref();
    f.out = out.ref();
    return f;
  }
};

void expect_forward_error(const Problem& p, const ForwardTensors& t, StatusCode code,
                          std::initializer_list<const char*> words) {
  const Status s = forward(p, t);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), code) << s.message();
  for (const char* w : words) EXPECT_NE(s.message().find(w), std::string::npos) << "'" << w << "' not in: " << s.message();
}

TEST(TensorChecks, GoodTensorsRun) {
  Tensors x;
  const Status s = forward(x.p, x.t());
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST(TensorChecks, WrongShapeNamesTensorAndBothShapes) {
  Tensors x;
  HostTensor bad(DType::kFloat32, {2, 16, 4, 8});
  ForwardTensors t = x.t();
  t.query = bad.ref();
  expect_forward_error(x.p, t, StatusCode::kInvalidArgument, {"query", "[2, 16, 4, 8]", "[2, 16, 12, 4, 8]"});
  HostTensor bad_k(DType::kFloat32, {2, 16, 12, 4, 8});  // kv_heads is 2
  t = x.t();
  t.key = bad_k.ref();
  expect_forward_error(x.p, t, StatusCode::kInvalidArgument, {"key", "[2, 16, 12, 2, 8]"});
}

// TensorRef holds at most kMaxTensorRank dims: contiguous() with more does not write
// past its arrays, and every call refuses such a tensor by name.
TEST(TensorChecks, TooManyDimensionsAreRefusedByName) {
  Tensors x;
  float unused = 0;
  const TensorRef seven = TensorRef::contiguous(&unused, DType::kFloat32, Device::kCPU, {2, 1, 16, 12, 1, 4, 8});
  EXPECT_EQ(seven.ndim, 7);
  EXPECT_EQ(seven.stride[kMaxTensorRank - 1], 1);
  ForwardTensors t = x.t();
  t.query = seven;
  expect_forward_error(x.p, t, StatusCode::kInvalidArgument, {"query", "7 dimensions", "at most 6"});
}

TEST(TensorChecks, WrongDtypeIsATypeError) {
  Tensors x;
  HostTensor bad(DType::kFloat16, {2, 16, 12, 2, 8});
  ForwardTensors t = x.t();
  t.value = bad.ref();
  expect_forward_error(x.p, t, StatusCode::kTypeMismatch, {"value", "float16", "float32"});
}

// lse (and d_rpb) are float32, float64 for float64 inputs (the spec): a float32 lse
// would carry float32 rounding into float64 gradients.
TEST(TensorChecks, LseIsFloat64ForFloat64Inputs) {
  Problem p = good();
  p.dtype = DType::kFloat64;
  HostTensor q{DType::kFloat64, {2, 16, 12, 4, 8}}, k{DType::kFloat64, {2, 16, 12, 2, 8}},
      v{DType::kFloat64, {2, 16, 12, 2, 8}}, out{DType::kFloat64, {2, 16, 12, 4, 8}};
  HostTensor lse32{DType::kFloat32, {2, 16, 12, 4}}, lse64{DType::kFloat64, {2, 16, 12, 4}};
  ForwardTensors t;
  t.query = q.ref();
  t.key = k.ref();
  t.value = v.ref();
  t.out = out.ref();
  t.lse = lse32.ref();
  expect_forward_error(p, t, StatusCode::kTypeMismatch, {"lse", "float32", "must be float64", "the problem is float64"});
  t.lse = lse64.ref();
  const Status s = forward(p, t);
  EXPECT_TRUE(s.ok()) << s.message();
  Tensors x;  // float32 inputs: a float64 lse is refused
  ForwardTensors t32 = x.t();
  t32.lse = lse64.ref();
  expect_forward_error(x.p, t32, StatusCode::kTypeMismatch, {"lse", "float64", "must be float32"});
}

TEST(TensorChecks, MixedDevicesAreATypeError) {
  Tensors x;
  ForwardTensors t = x.t();
  t.key.device = Device::kCUDA;
  expect_forward_error(x.p, t, StatusCode::kTypeMismatch, {"key", "cuda", "one device"});
}

TEST(TensorChecks, NullPointersAreRejected) {
  Tensors x;
  ForwardTensors t = x.t();
  t.out.data = nullptr;
  expect_forward_error(x.p, t, StatusCode::kInvalidArgument, {"out", "required"});
  Problem p = x.p;
  p.has_rpb = true;
  expect_forward_error(p, x.t(), StatusCode::kInvalidArgument, {"rpb", "required"});
  p = x.p;
  p.additional_tokens = 3;
  expect_forward_error(p, x.t(), StatusCode::kInvalidArgument, {"additional_keys", "required"});
}

TEST(TensorChecks, RpbWithoutFlagIsRejected) {
  Tensors x;
  HostTensor rpb(DType::kFloat32, {4, 9, 5});
  ForwardTensors t = x.t();
  t.rpb = rpb.ref();
  expect_forward_error(x.p, t, StatusCode::kInvalidArgument, {"rpb", "has_rpb"});
}

TEST(TensorChecks, InvalidProblemComesFirst) {
  Tensors x;
  Problem p = x.p;
  p.kernel[0] = 17;
  expect_forward_error(p, x.t(), StatusCode::kInvalidArgument, {"kernel_size[axis 0] = 17"});
}

TEST(TensorChecks, UnbuiltOrWrongDeviceBackendIsExplained) {
  Tensors x;
  Options o;
  o.backend = Backend::kFused;
  const Status s = forward(x.p, x.t(), o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("fused"), std::string::npos) << s.message();
}

TEST(Backends, ParseAndList) {
  Backend b;
  EXPECT_TRUE(parse_backend("cpu", &b).ok());
  EXPECT_EQ(b, Backend::kCpu);
  const Status s = parse_backend("gpu", &b);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("'gpu'"), std::string::npos);
  bool has_reference = false;
  for (const BackendInfo& info : built_backends()) has_reference |= info.backend == Backend::kReference;
  EXPECT_TRUE(has_reference);
}

}  // namespace
}  // namespace nbhd
