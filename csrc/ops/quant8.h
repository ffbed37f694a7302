// 8-bit blockwise optimizer states (state_dtype=torch.int8), shared by the CPU
// and CUDA drivers: the codes, and what a block is.
//
// A state tensor is cut into blocks of kQuantBlock elements of its param (the
// last block of a tensor may be shorter; blocks never cross tensors). Each
// block keeps one byte per element and one fp32 scale, its absmax: the value
// of an element is decode(code) * absmax, with decode(code) in [-1, 1].
//
// The codes are small floats (a sign for signed states, exponent bits and
// mantissa bits), relative to the block's absmax:
// - signed states (Adam's exp_avg, momentum buffers): sign + 3 exponent bits +
//   4 mantissa bits: |x| in {0} u [2^-10, 1], 3.1% relative rounding error at
//   most from 2^-6 up (subnormal steps of 2^-10 below 2^-6). The update is
//   proportional to the first moment, so its precision near the block's largest
//   values counts more than range below 1e-3 of them: over 30 seeds of the small
//   CNN of python/fusedopt/benchmarking/training_tasks.py the final loss is 0.7%
//   below bitsandbytes' (dynamic code) on average, where sign + 4 exponent + 3
//   mantissa bits (fusedopt's first format, still read from checkpoints:
//   optim/state.py) was 0.2% above it;
// - non-negative states (exp_avg_sq, max_exp_avg_sq): 5 exponent bits + 3
//   mantissa bits: x in {0} u [2^-33, 1]. A second moment spans many decades
//   inside a block, and one rounded to 0 next to a nonzero first moment would
//   make a huge step; the wider range keeps values down to 1e-10 of the block's
//   largest (the error on sqrt(v), what the update uses, is at most 3.1%).
// Like the dynamic code of Dettmers et al. (2022, "8-bit optimizers via
// block-wise quantization") these keep relative precision over many decades;
// unlike a 256-entry table they are computed with integer and float
// arithmetic, so encoding is exact round-to-nearest (ties to the even code)
// without a search, and the CPU loops vectorize.
#pragma once
#include <cstdint>

#include "common.h"

namespace fusedopt {

constexpr int64_t kQuantBlock = 256;

FO_HD int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

// A float code with E exponent bits and M mantissa bits for x in [0, 1]: the
// top exponent field (2^E - 1) stands for 2^0, field 0 for the subnormals.
template <int E, int M>
struct SmallFloat {
  static constexpr uint32_t kTop = (1u << E) - 1;
  static constexpr int kMinExp = 1 - static_cast<int>(kTop);  // exponent of field 1

  // Nearest code to x in [0, 1 + ulp], ties to even.
  FO_HD static uint32_t encode(float x) {
    // x = value * quant_inverse(scale) is at most 1 + ulp (block_scale), which still
    // rounds to the top code (field kTop, mantissa 0): only the lower end is
    // clamped (and NaN, from an inf or NaN value, to 0).
    x = x > 0.0f ? x : 0.0f;
    const uint32_t u = float_bits(x);
    // Normal range: rebias the exponent so field 1 is 2^kMinExp, keep M bits, round to nearest even.
    const uint32_t a = u - ((127u - kTop) << 23);
    const uint32_t normal = (a + ((1u << (22 - M)) - 1u) + ((a >> (23 - M)) & 1u)) >> (23 - M);
    // Below 2^kMinExp: adding 2^(kMinExp - M + 23) makes the float adder align x
    // to the subnormal step 2^(kMinExp - M) and round to nearest even.
    const float magic = bits_float(static_cast<uint32_t>(127 + kMinExp - M + 23) << 23);
    const uint32_t subnormal = float_bits(x + magic) - float_bits(magic);
    return u < (static_cast<uint32_t>(127 + kMinExp) << 23) ? subnormal : normal;
  }

  // The fp32 bit pattern of a code's value (integer selects: the CPU loops vectorize).
  FO_HD static uint32_t decode_bits(uint32_t code) {
    const uint32_t field = code >> M, mant = code & ((1u << M) - 1u);
    const uint32_t normal = ((field + 127u - kTop) << 23) | (mant << (23 - M));
    const float step = bits_float(static_cast<uint32_t>(127 + kMinExp - M) << 23);
    const uint32_t subnormal = float_bits(static_cast<float>(static_cast<int32_t>(mant)) * step);
    // A mask, not ?: (which GCC turns into a branch here, and the loop then stays scalar).
    const uint32_t is_normal = 0u - static_cast<uint32_t>(field != 0);
    return (normal & is_normal) | (subnormal & ~is_normal);
  }
};

using SignedMagnitude = SmallFloat<3, 4>;  // the 7 bits under the sign
using UnsignedCode = SmallFloat<5, 3>;

// Which code a state uses. kSigned: sign bit 0x80 over a SignedMagnitude.
enum class Code8 { kSigned, kUnsigned };

// NaN (whose sign bit depends on how it was made) and -0 get the codes of +0:
// a block with a NaN decodes to NaN through its absmax, and codes stay canonical.
template <Code8 K> FO_HD uint8_t encode8(float x) {
  if constexpr (K == Code8::kSigned) {
    const uint32_t sign = x < 0.0f ? 0x80u : 0u;
    return static_cast<uint8_t>(sign | SignedMagnitude::encode(x < 0.0f ? -x : x));
  } else {
    return static_cast<uint8_t>(UnsignedCode::encode(x));
  }
}

template <Code8 K> FO_HD float decode8(uint8_t code) {
  const uint32_t c = code;
  if constexpr (K == Code8::kSigned) {
    return bits_float(SignedMagnitude::decode_bits(c & 0x7Fu) | ((c & 0x80u) << 24));
  } else {
    return bits_float(UnsignedCode::decode_bits(c));
  }
}

// The block scale: the largest |value|, NaN when any value is NaN (fmaxf would
// drop it and hide the NaN from every later step).
FO_HD float absmax_with(float running, float value) {
  const float a = value < 0.0f ? -value : value;
  const bool nan = (a != a) | (running != running);
  return nan ? (a != a ? a : running) : (a > running ? a : running);
}

// |x| by clearing the sign bit (NaN stays NaN).
FO_HD float float_bits_abs(float x) { return bits_float(float_bits(x) & 0x7FFFFFFFu); }

// The scale a block keeps for its largest |value| a: 0 when a is below the
// smallest normal fp32 (1 / a would overflow; such a block, a moment decayed to
// nothing, is stored as zeros), else a itself (NaN stays NaN).
FO_HD float block_scale(float a) { return a < 1.17549435e-38f ? 0.0f : a; }

// What values are multiplied by to be encoded: 1 / scale (finite, as the scale
// is 0 or normal), 0 for an all-zero block and for a NaN or inf scale.
FO_HD float quant_inverse(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }

}  // namespace fusedopt
