// SPDX-License-Identifier: Apache-2.0
// Element types and devices, and host conversions for the 16-bit float formats.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

namespace nbhd {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };
enum class Device { kCPU, kCUDA };

inline constexpr const char* name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

inline constexpr const char* name(Device d) { return d == Device::kCPU ? "cpu" : "cuda"; }

inline constexpr int size_of(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// The dtype of lse and d_rpb for inputs of dtype t: float32, float64 for float64
// inputs (so float64 gradients keep float64 accuracy).
inline constexpr DType accumulator_dtype(DType t) { return t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// Host-side storage types for the 16-bit formats (bit patterns, no arithmetic).
struct half_bits { uint16_t bits; };
struct bfloat16_bits { uint16_t bits; };

inline float to_float(half_bits h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400u)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as the hardware conversion does.
inline half_bits to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return {uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0))};
  if (ax >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, m * 2^-24 with m < 1024
    float mag;
    std::memcpy(&mag, &ax, 4);
    return {uint16_t(sign | uint16_t(std::nearbyint(mag * 16777216.0f)))};  // exact scaling, RNE
  }
  uint32_t r = ax + 0xc8000000u;  // rebias exponent: (127 - 15) << 23
  r += 0xfffu + ((r >> 13) & 1u);
  return {uint16_t(sign | (r >> 13))};
}

inline float to_float(bfloat16_bits b) {
  const uint32_t bits = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bfloat16_bits to_bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40u)};  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return {uint16_t(x >> 16)};
}

// Round a value to what a tensor of dtype t can hold (the identity for float64).
inline double round_to(DType t, double v) {
  switch (t) {
    case DType::kFloat16: return to_float(to_half(float(v)));
    case DType::kBFloat16: return to_float(to_bfloat16(float(v)));
    case DType::kFloat32: return float(v);
    case DType::kFloat64: return v;
  }
  return v;
}

}  // namespace nbhd
