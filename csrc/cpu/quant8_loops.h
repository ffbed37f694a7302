// The CPU side of 8-bit blockwise states (ops/quant8.h): blocks decoded into
// fp32 buffers on the stack, updated by the unchanged per-element math, and
// encoded back with their new absmax, one block at a time (the buffers stay in
// L1). Defined inside the SIMD level's namespace, like optim_loops.h.
#pragma once
#ifndef FUSEDOPT_SIMD_NS
#error "quant8_loops.h belongs to the per-SIMD-level sources (CMake sets FUSEDOPT_SIMD_NS)"
#endif
#include <algorithm>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../ops/adam.h"
#include "../ops/dispatch.h"
#include "../ops/quant8.h"
#include "../ops/sgd.h"
#include "multi_tensor_cpu.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {

// Offsets of each row in blocks, for for_each_piece: a piece is then a range of
// whole blocks of one row, and a chunk kCpuChunkElements / kQuantBlock blocks.
inline std::vector<int64_t> row_block_offsets(const OptimCall& call) {
  std::vector<int64_t> off(static_cast<size_t>(call.n_rows) + 1, 0);
  for (int64_t r = 0; r < call.n_rows; ++r) off[r + 1] = off[r] + quant_blocks(call.rows[r].numel);
  return off;
}
constexpr int64_t kChunkBlocks = kCpuChunkElements / kQuantBlock;

// absmax_with over a whole block, on the bit patterns: with the sign cleared,
// the integer order of floats is their order, and every NaN lies above inf, so
// a plain unsigned maximum (which vectorizes; a float max reduction does not
// without -ffast-math) finds the absmax and lets any NaN win. The NaN found is
// returned as the canonical one.
inline float block_absmax(const float* __restrict__ in) {
  uint32_t mx = 0;
  for (int64_t j = 0; j < kQuantBlock; ++j) {
    const uint32_t a = float_bits(in[j]) & 0x7FFFFFFFu;
    mx = a > mx ? a : mx;
  }
  return bits_float(mx > 0x7F800000u ? 0x7FC00000u : mx);
}

// The codes are IEEE half bit patterns in disguise, so where the CPU converts
// halves in hardware (F16C) a block decodes with a few 16-bit integer operations
// and one conversion per 16 elements, the same values as decode8 (ops/quant8.h):
// - signed: sign, then the 7 bits e3m4 = a half's exponent (< 8) and top 4
//   mantissa bits: the half with bits (c & 0x80) << 8 | (c & 0x7F) << 6 is the
//   value times 2^-8 (field 7, the code's 2^0, is the half's 2^-8; field 0 lands on
//   the halves' subnormals, as the code's subnormals do);
// - unsigned e5m3: the half with bits c << 7 is the value times 2^16, except in
//   the top binade (field 31, 2^0), which a half reads as inf: there the half one
//   binade down ((c << 7) - 0x400) is doubled. (Moving every code down one binade
//   would not do: field 1 would land on the halves' subnormals, which lack the
//   implicit 1.)
// Returns how many of the n elements it decoded (a multiple of the vector width).
template <Code8 K>
inline int64_t decode_as_halves(const uint8_t* __restrict__ c, int64_t n, float scale, float* __restrict__ out) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
  const __m512 vscale = _mm512_set1_ps(scale), unit = _mm512_set1_ps(1.0f / 65536.0f);
  for (; i + 16 <= n; i += 16) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
    __m512 f;
    if constexpr (K == Code8::kSigned) {
      const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                        _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 6));
      f = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
    } else {
      const __m256i h = _mm256_slli_epi16(w, 7);
      const __m256i top = _mm256_cmpgt_epi16(w, _mm256_set1_epi16(247));
      const __m256i bits = _mm256_blendv_epi8(h, _mm256_sub_epi16(h, _mm256_set1_epi16(0x400)), top);
      f = _mm512_mul_ps(_mm512_cvtph_ps(bits), unit);
      f = _mm512_mask_add_ps(f, _mm256_movepi16_mask(top), f, f);
    }
    _mm512_storeu_ps(out + i, _mm512_mul_ps(f, vscale));
  }
#elif defined(__AVX2__) && defined(__F16C__)
  const __m256 vscale = _mm256_set1_ps(scale), unit = _mm256_set1_ps(1.0f / 65536.0f);
  for (; i + 8 <= n; i += 8) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
    __m256 f;
    if constexpr (K == Code8::kSigned) {
      const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8),
                                     _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 6));
      f = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    } else {
      const __m128i h = _mm_slli_epi16(w, 7);
      const __m128i top = _mm_cmpgt_epi16(w, _mm_set1_epi16(247));
      const __m128i bits = _mm_blendv_epi8(h, _mm_sub_epi16(h, _mm_set1_epi16(0x400)), top);
      f = _mm256_mul_ps(_mm256_cvtph_ps(bits), unit);
      f = _mm256_blendv_ps(f, _mm256_add_ps(f, f), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(top)));
    }
    _mm256_storeu_ps(out + i, _mm256_mul_ps(f, vscale));
  }
#else
  (void)c, (void)n, (void)scale, (void)out;
#endif
  return i;
}

// The code of x = in[i] * inv through a half (see decode_as_halves): the
// conversion truncates (round toward zero), a bit is set where that dropped
// anything (round to odd, with 6 or 7 spare bits), and rounding the half's pattern
// to nearest even at the code's lowest bit (kCodeShift: 6 or 7) then gives
// exactly the nearest code, subnormals included.
// - signed: the half of |x| * 2^-8 (NaN -> 0, and -0 is not negative; exact: a
//   power of two, and a product that is an fp32 subnormal encodes as 0 either
//   way), then the sign. x = 1 is the half 2^-8 = 0x1C00, code 0x70;
// - unsigned: the half of max(x, 0) * 2^16 (exact: a power of two). x = 1 (the
//   top code, 248) is 2^16, past the largest half, but truncation saturates it
//   at 65504 = 0x7BFF, inexact, whose rounding at bit 7 carries into 0x7C00 >> 7
//   = 248, as do the values in (1 - 2^-5, 1] that round to it.
// Returns how many of the n elements it encoded (a multiple of the vector width).
template <Code8 K>
constexpr int kCodeShift = K == Code8::kSigned ? 6 : 7;  // the half's bit that is the code's lowest
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
// 16 lanes: the half patterns and which of them are inexact.
template <Code8 K>
inline __m256i truncated_halves(__m512 x, __mmask16& inexact, __mmask16& negative) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a;
  if constexpr (K == Code8::kSigned) {
    negative = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
    a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
    a = _mm512_mul_ps(_mm512_max_ps(a, zero), _mm512_set1_ps(1.0f / 256.0f));  // NaN -> 0 (max returns the second operand)
  } else {
    negative = 0;
    a = _mm512_mul_ps(_mm512_max_ps(x, zero), _mm512_set1_ps(65536.0f));  // NaN and -0 -> +0
  }
  const __m256i h = _mm512_cvtps_ph(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  inexact = _mm512_cmp_ps_mask(_mm512_cvtph_ps(h), a, _CMP_NEQ_UQ);
  return h;
}
#endif

template <Code8 K>
inline int64_t encode_as_halves(const float* __restrict__ in, int64_t n, float inv, uint8_t* __restrict__ c) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 32 <= n; i += 32) {
    __mmask16 inexact_lo, inexact_hi, negative_lo, negative_hi;
    const __m256i lo = truncated_halves<K>(_mm512_mul_ps(_mm512_loadu_ps(in + i), vinv), inexact_lo, negative_lo);
    const __m256i hi = truncated_halves<K>(_mm512_mul_ps(_mm512_loadu_ps(in + i + 16), vinv), inexact_hi, negative_hi);
    __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    h = _mm512_or_si512(h, _mm512_maskz_set1_epi16(_mm512_kunpackw(inexact_hi, inexact_lo), 1));
    constexpr int shift = kCodeShift<K>;
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(h, shift), _mm512_set1_epi16(1));
    const __m512i below_half = _mm512_set1_epi16((1 << (shift - 1)) - 1);
    __m512i code = _mm512_srli_epi16(_mm512_add_epi16(_mm512_add_epi16(h, below_half), odd), shift);
    if constexpr (K == Code8::kSigned)
      code = _mm512_or_si512(code, _mm512_maskz_set1_epi16(_mm512_kunpackw(negative_hi, negative_lo), 0x80));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), _mm512_cvtepi16_epi8(code));
  }
#elif defined(__AVX2__) && defined(__F16C__)
  const __m256 vinv = _mm256_set1_ps(inv), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(in + i), vinv);
    __m256 a;
    if constexpr (K == Code8::kSigned) {
      a = _mm256_max_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))), zero);
      a = _mm256_mul_ps(a, _mm256_set1_ps(1.0f / 256.0f));
    } else {
      a = _mm256_mul_ps(_mm256_max_ps(x, zero), _mm256_set1_ps(65536.0f));
    }
    __m128i h = _mm256_cvtps_ph(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    // 32-bit lanes of all ones where inexact, packed to 16-bit ones (signed saturation keeps -1).
    const __m256i inexact = _mm256_castps_si256(_mm256_cmp_ps(_mm256_cvtph_ps(h), a, _CMP_NEQ_UQ));
    const __m128i inexact16 = _mm_packs_epi32(_mm256_castsi256_si128(inexact), _mm256_extracti128_si256(inexact, 1));
    h = _mm_or_si128(h, _mm_and_si128(inexact16, _mm_set1_epi16(1)));
    constexpr int shift = kCodeShift<K>;
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(h, shift), _mm_set1_epi16(1));
    const __m128i below_half = _mm_set1_epi16((1 << (shift - 1)) - 1);
    __m128i code = _mm_srli_epi16(_mm_add_epi16(_mm_add_epi16(h, below_half), odd), shift);
    if constexpr (K == Code8::kSigned) {
      const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_LT_OQ));
      const __m128i neg16 = _mm_packs_epi32(_mm256_castsi256_si128(neg), _mm256_extracti128_si256(neg, 1));
      code = _mm_or_si128(code, _mm_and_si128(neg16, _mm_set1_epi16(0x80)));
    }
    _mm_storel_epi64(reinterpret_cast<__m128i*>(c + i), _mm_packus_epi16(code, code));
  }
#else
  (void)in, (void)n, (void)inv, (void)c;
#endif
  return i;
}

// n values of a block from their codes and the block's scale.
template <Code8 K>
inline void decode_block(const uint8_t* __restrict__ c, int64_t n, float scale, float* __restrict__ out) {
  const int64_t done = decode_as_halves<K>(c, n, scale, out);
  for (int64_t i = done; i < n; ++i) out[i] = decode8<K>(c[i]) * scale;
}

// A block's n values as codes; returns its scale. in[n..kQuantBlock) must be 0
// (the tail of a short last block must not count in its absmax).
template <Code8 K>
inline void encode_scaled(const float* __restrict__ in, int64_t n, float inv, uint8_t* __restrict__ c) {
  const int64_t done = encode_as_halves<K>(in, n, inv, c);
  for (int64_t i = done; i < n; ++i) c[i] = encode8<K>(in[i] * inv);
}
template <Code8 K>
inline float encode_block(const float* __restrict__ in, int64_t n, uint8_t* __restrict__ c) {
  const float scale = block_scale(block_absmax(in));
  encode_scaled<K>(in, n, quant_inverse(scale), c);
  return scale;
}

// One quantized state of a row: its codes and its row of the absmax tensor.
template <Code8 K>
struct QuantState {
  uint8_t* __restrict__ codes;
  float* __restrict__ absmax;
  QuantState(const TensorRow& r, int codes_column, int absmax_column, int index)
      : codes(col<uint8_t>(r, codes_column)),
        absmax(col<float>(r, absmax_column) + index * quant_blocks(r.numel)) {}

  // Elements [b, b + n) of block `blk` as fp32 values into out.
  void decode(int64_t blk, int64_t b, int64_t n, float* __restrict__ out) const {
    decode_block<K>(codes + b, n, absmax[blk], out);
  }
  // The block's new values (in[n..kQuantBlock) must be 0) as codes and absmax.
  void encode(int64_t blk, int64_t b, int64_t n, const float* __restrict__ in) const {
    absmax[blk] = encode_block<K>(in, n, codes + b);
  }
};

// Runs fn(block, begin, count) over the blocks [bb, be) of a row of numel elements.
template <class Fn>
inline void for_each_block(int64_t numel, int64_t bb, int64_t be, Fn&& fn) {
  for (int64_t blk = bb; blk < be; ++blk) {
    const int64_t b = blk * kQuantBlock;
    fn(blk, b, std::min(kQuantBlock, numel - b));
  }
}

// Zeroes buf[n..kQuantBlock): the tail of a short last block must not count in its absmax.
inline void clear_tail(float* buf, int64_t n) {
  for (int64_t i = n; i < kQuantBlock; ++i) buf[i] = 0.0f;
}

// The momentum loop of SGD and LARS (optim_loops.h momentum_piece) over the whole
// blocks [bb, be) of a row whose buffer is 8-bit (its scales in absmax_column);
// kStore, sr: how p is stored (multi_tensor_cpu.h ParamStore).
template <class P, int kStore, class Scalars, class Element>
void momentum_q8_piece(const TensorRow& r, const MomentumColumns& c, int absmax_column, int64_t bb, int64_t be,
                       const Scalars s, Element&& element, StochasticRounding sr) {
  const ParamIO<P, float, kStore> p(r, c.param, c.master, sr);
  const P* __restrict__ g = col<const P>(r, c.grad);
  const QuantState<Code8::kSigned> buf(r, c.buffer, absmax_column, 0);
  const float first = momentum_first_step(r, c.age) ? 1.0f : 0.0f;
  alignas(64) float bufb[kQuantBlock];
  for_each_block(r.numel, bb, be, [&](int64_t blk, int64_t b, int64_t n) {
    buf.decode(blk, b, n, bufb);
    for (int64_t i = 0; i < n; ++i) {
      float pv = p.load(b + i);
      element(pv, load_as<P, float>(g[b + i]), bufb[i], first, s);
      p.store(b + i, pv);
    }
    clear_tail(bufb, n);
    buf.encode(blk, b, n, bufb);
  });
}

// The 8-bit-state drivers (optim_q8_cpu.cpp); multi_tensor_adam/sgd hand a call
// with state_dtype kInt8 to these.
void multi_tensor_adam_q8(const OptimCall& call, const AdamHyper& h);
void multi_tensor_sgd_q8(const OptimCall& call, const SgdHyper& h);

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
