// Shared by the CPU and CUDA drivers: host/device qualifiers, dtype codes and
// the float <-> fp16/bf16 conversions every kernel uses for loads and stores.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline __attribute__((always_inline))
#endif

namespace fusedopt {

// Exported by name in _C.LAYOUT (bindings/bind_layout.cpp); Python reads them from there.
// kInt8: 8-bit blockwise states (ops/quant8.h), never a param dtype.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt8 = 4 };

// Storage types for 16-bit floats: plain bit patterns, so the same struct works
// on host and device and the conversions below are the only place that knows
// the encodings.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

FO_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
FO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// bf16 = upper half of an fp32, rounded to nearest even; NaN stays a quiet NaN.
FO_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x0040u) : rounded);
}
FO_HD float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// IEEE fp16 with round to nearest even, written with integer selects so that
// compilers vectorize it. Covers normals, subnormals, overflow to inf and NaN.
FO_HD uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  // Normal range: rebias exponent (127 -> 15), keep 10 mantissa bits, RNE.
  uint32_t normal = ((a - 0x38000000u) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal range (|f| < 2^-14): add 0.5 so the float adder does the
  // alignment and the rounding to nearest even for us.
  float sub_f = bits_float(a) + 0.5f;
  uint32_t subnormal = float_bits(sub_f) - 0x3F000000u;
  uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477FF000u ? 0x7C00u : r;               // rounds past 65504 -> inf
  r = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : r;  // NaN stays NaN
  return static_cast<uint16_t>(sign | r);
}
FO_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  // Normals and inf/NaN by rebiasing; subnormals via a float multiply by 2^-24.
  uint32_t normal = ((e == 0x1Fu ? 0xFFu : e + 112u) << 23) | (m << 13);
  float sub = static_cast<float>(m) * 5.9604644775390625e-08f;
  uint32_t mag = e == 0 ? float_bits(sub) : normal;
  return bits_float(sign | mag);
}

// load/store: the single place where a storage type meets the compute type.
template <class T> FO_HD float to_float(T x) { return static_cast<float>(x); }
template <> FO_HD float to_float<Half>(Half x) { return half_bits_to_float(x.bits); }
template <> FO_HD float to_float<BFloat16>(BFloat16 x) { return bf16_bits_to_float(x.bits); }

template <class T, class C> FO_HD C load_as(const T& x) { return static_cast<C>(to_float(x)); }
template <> FO_HD double load_as<double, double>(const double& x) { return x; }

template <class T> struct StoreFrom { template <class C> FO_HD static T conv(C v) { return static_cast<T>(v); } };
template <> struct StoreFrom<Half> { template <class C> FO_HD static Half conv(C v) { return Half{float_to_half_bits(static_cast<float>(v))}; } };
template <> struct StoreFrom<BFloat16> { template <class C> FO_HD static BFloat16 conv(C v) { return BFloat16{float_to_bf16_bits(static_cast<float>(v))}; } };
template <class T, class C> FO_HD void store_as(T& dst, C v) { dst = StoreFrom<T>::template conv<C>(v); }

// v as the storage type S holds it (round to nearest even for 16-bit S; the
// identity for fp32/fp64): for math that must use a state exactly as stored.
template <class S, class C> FO_HD C round_as(C v) {
  S tmp;
  store_as(tmp, v);
  return load_as<S, C>(tmp);
}

// sqrt in the compute type (an unqualified sqrt(float) may resolve to the
// double overload, which is slower and rounds differently from torch).
FO_HD float fo_sqrt(float x) { return sqrtf(x); }
FO_HD double fo_sqrt(double x) { return sqrt(x); }

// Element type -> compute type: fp64 params compute in fp64, all else in fp32.
template <class P> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

}  // namespace fusedopt
