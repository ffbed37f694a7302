// Stochastic rounding of the fp32 result of the per-element math to a 16-bit
// param (fp16/bf16 without a master copy), and the counter-based random bits it
// uses. The one definition for the CPU drivers (cpu/multi_tensor_cpu.h ParamIO)
// and the CUDA drivers (cuda/multi_tensor.cuh store_param).
//
// An element's random bits are a pure function of (call seed, row salt, the
// element's index in its param tensor): no generator state, nothing per thread
// or per chunk, so results are the same for any thread count, any chunking and
// on either device. The call seed changes every step (rounding_call_seed of a
// user seed, a step count and the param group; call_seed_of); the row salt is
// the row's position in the functional call (python/fusedopt/_kernels/rows.py),
// so two params of a call get different bits.
//
// The generator is splitmix64's output function (a 64-bit bijection with full
// avalanche: two xor-shift-multiply rounds) applied to a Weyl sequence keyed by
// a hash of (seed, salt). For consecutive indices under one key this is the
// splitmix64 generator, which passes BigCrush and PractRand; rounding needs far
// less (16 or 13 uniform bits per element, independent between elements). It is
// NOT cryptographic: mix64 is invertible, so the key follows from one output.
#pragma once
#include <cstdint>

#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

constexpr uint64_t kWeylStep = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio, odd

// splitmix64's finalizer (the "Mix13" constants of D. Stafford's variants).
FO_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The seed of one call from a user seed, a step count and a stream (the param
// group). Host callers pass its result (fusedopt.functional.stochastic_rounding_seed);
// the optimizer classes pass the three words in device memory instead (call_seed_of).
FO_HD uint64_t rounding_call_seed(uint64_t seed, uint64_t step, uint64_t stream) {
  return mix64(mix64(mix64(seed) ^ step) + stream * kWeylStep);
}

// The call seed a kernel rounds with: the host number, or rounding_call_seed of
// the words (read here, on the device the kernel runs on; two's complement int64
// words are the uint64 values mod 2^64, so both forms give the same bits).
FO_HD uint64_t call_seed_of(const StochasticRounding& sr) {
  if (!sr.words) return sr.seed;
  return rounding_call_seed(static_cast<uint64_t>(sr.words[0]), static_cast<uint64_t>(sr.words[1]),
                            static_cast<uint64_t>(sr.words[2]));
}

// The salt of a row: its position in the call, in the high bits of its flags.
FO_HD uint64_t row_salt(const TensorRow& r) { return static_cast<uint64_t>(r.flags) >> kRowSaltShift; }

// The key of one row of a call; every element of the row derives its bits from it.
FO_HD uint64_t rounding_row_key(uint64_t call_seed, const TensorRow& r) {
  return mix64(call_seed ^ mix64(row_salt(r) + kWeylStep));
}

// 32 uniform random bits for element `index` (its position in the param tensor).
FO_HD uint32_t rounding_bits(uint64_t row_key, int64_t index) {
  return static_cast<uint32_t>(mix64(row_key + (static_cast<uint64_t>(index) + 1) * kWeylStep) >> 32);
}

// bf16: the magnitude's fp32 bits plus 16 random bits, truncated to the upper
// half: rounds up with probability (distance to the lower neighbour) / ulp.
// Exactly representable values stay exact (their low half is 0); NaN stays a
// quiet NaN; values round-to-nearest sends to inf (and inf) become inf; the
// rest clamps to the largest finite, so overflow is exactly RNE's.
FO_HD uint16_t float_to_bf16_bits_stochastic(float f, uint32_t random) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t r = (a + (random >> 16)) >> 16;
  r = r > 0x7F7Fu ? 0x7F7Fu : r;
  r = a >= 0x7F7F8000u ? 0x7F80u : r;
  return static_cast<uint16_t>(a > 0x7F800000u ? ((u >> 16) | 0x0040u) : (sign | r));
}

// fp16: the same on the fp32 bits below the fp16 ulp: 13 in fp16's normal
// range, more in its subnormal range (ulp 2^-24), where the significand (with
// its implicit bit) is shifted into units of 2^-24 with 32 fraction bits; the
// random word is added to the fraction and the carry is the rounding. Below
// 2^-56 (|x| < 2^-32 ulps) nothing rounds up. Overflow, inf and NaN as
// float_to_half_bits.
FO_HD uint16_t float_to_half_bits_stochastic(float f, uint32_t random) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t e = a >> 23;
  const uint32_t e1 = e > 0 ? e : 1u;  // fp32 subnormals: exponent 1, no implicit bit
  const uint64_t significand = (a & 0x7FFFFFu) | (e > 0 ? 0x800000u : 0u);
  const uint32_t dropped = 13u + (e1 < 113u ? 113u - e1 : 0u);  // fp32 bits below the fp16 ulp
  const uint64_t fixed = (significand << 32) >> (dropped < 63u ? dropped : 63u);
  const uint32_t units = static_cast<uint32_t>((fixed + random) >> 32);  // in fp16 ulps of this binade
  uint32_t r = (e1 > 113u ? (e1 - 113u) << 10 : 0u) + units;  // a carry into the next binade is the next exponent
  r = r > 0x7BFFu ? 0x7BFFu : r;
  r = a >= 0x477FF000u ? 0x7C00u : r;
  r = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : r;
  return static_cast<uint16_t>(sign | r);
}

// The store of a param element: stochastically rounded for 16-bit params; fp32
// and fp64 params hold the result exactly as computed (no rounding to do).
template <class T, class C> FO_HD void store_stochastic(T& dst, C v, uint32_t) { store_as(dst, v); }
template <class C> FO_HD void store_stochastic(Half& dst, C v, uint32_t random) {
  dst = Half{float_to_half_bits_stochastic(static_cast<float>(v), random)};
}
template <class C> FO_HD void store_stochastic(BFloat16& dst, C v, uint32_t random) {
  dst = BFloat16{float_to_bf16_bits_stochastic(static_cast<float>(v), random)};
}

template <class T> struct IsSixteenBit { static constexpr bool value = false; };
template <> struct IsSixteenBit<Half> { static constexpr bool value = true; };
template <> struct IsSixteenBit<BFloat16> { static constexpr bool value = true; };

}  // namespace fusedopt
