// Adam/AdamW and SGD with 8-bit blockwise states on the CPU (ops/quant8.h).
// Compiled once per SIMD level. Each piece is a range of whole blocks of one
// row; a block is decoded, stepped by the per-element math of ops/adam.h or
// ops/sgd.h in fp32, and encoded with its new absmax: one read and one write
// of each code byte per step.
#include <algorithm>
#include <vector>

#include "../ops/dispatch.h"
#include "optim_cpu.h"
#include "optim_loops.h"
#include "quant8_loops.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

template <class P, bool kAmsgrad, int kStore, bool kPlain>
void adam_q8_piece(const TensorRow& r, int64_t bb, int64_t be, const AdamScalars<float> s, StochasticRounding sr) {
  const ParamIO<P, float, kStore> p(r, kAdamParam, kAdamMaster, sr);
  const P* __restrict__ g = col<const P>(r, kAdamGrad);
  const QuantState<Code8::kSigned> m(r, kAdamExpAvg, kAdamAbsmax, 0);
  const QuantState<Code8::kUnsigned> v(r, kAdamExpAvgSq, kAdamAbsmax, 1);
  const QuantState<Code8::kUnsigned> vmax(r, kAdamMaxExpAvgSq, kAdamAbsmax, 2);
  alignas(64) float mb[kQuantBlock], vb[kQuantBlock], vmaxb[kQuantBlock];
  for_each_block(r.numel, bb, be, [&](int64_t blk, int64_t b, int64_t n) {
    m.decode(blk, b, n, mb);
    v.decode(blk, b, n, vb);
    if (kAmsgrad) vmax.decode(blk, b, n, vmaxb);
    for (int64_t i = 0; i < n; ++i) {
      float pv = p.load(b + i), vm = kAmsgrad ? vmaxb[i] : 0.0f;
      adam_element<float, kPlain>(pv, load_as<P, float>(g[b + i]), mb[i], vb[i], vm, s);
      p.store(b + i, pv);
      if (kAmsgrad) vmaxb[i] = vm;
    }
    clear_tail(mb, n);
    clear_tail(vb, n);
    m.encode(blk, b, n, mb);
    v.encode(blk, b, n, vb);
    if (kAmsgrad) {
      clear_tail(vmaxb, n);
      vmax.encode(blk, b, n, vmaxb);
    }
  });
}

template <Code8 K>
void quantize_blocks(const float* values, int64_t numel, uint8_t* codes, float* absmax) {
  alignas(64) float block[kQuantBlock];
  for_each_block(numel, 0, quant_blocks(numel), [&](int64_t blk, int64_t b, int64_t n) {
    std::copy(values + b, values + b + n, block);
    clear_tail(block, n);
    absmax[blk] = encode_block<K>(block, n, codes + b);
  });
}

template <Code8 K>
void dequantize_blocks(const uint8_t* codes, const float* absmax, int64_t numel, float* values) {
  for_each_block(numel, 0, quant_blocks(numel), [&](int64_t blk, int64_t b, int64_t n) {
    decode_block<K>(codes + b, n, absmax[blk], values + b);
  });
}

}  // namespace

void quantize8(const float* values, int64_t numel, uint8_t* codes, float* absmax, bool is_signed) {
  is_signed ? quantize_blocks<Code8::kSigned>(values, numel, codes, absmax)
            : quantize_blocks<Code8::kUnsigned>(values, numel, codes, absmax);
}

void dequantize8(const uint8_t* codes, const float* absmax, int64_t numel, float* values, bool is_signed) {
  is_signed ? dequantize_blocks<Code8::kSigned>(codes, absmax, numel, values)
            : dequantize_blocks<Code8::kUnsigned>(codes, absmax, numel, values);
}

void multi_tensor_adam_q8(const OptimCall& call, const AdamHyper& h) {
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_q8_param(call.param_dtype, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    const std::vector<AdamScalars<float>> scalars = step_scalars<AdamScalars<float>>(
        call, kAdamStep, true, [&](double t) { return adam_scalars<float>(h, t, lr, divisor); });
    const bool amsgrad = h.flags & kAdamAmsgrad;
    const bool plain = adam_is_plain(h, divisor);
    with_param_store<P>(call, kAdamMaster, [&](auto store) {
      constexpr int M = decltype(store)::value;
      for_each_piece(call.rows, row_block_offsets(call), kChunkBlocks, [&](int64_t, int64_t r, int64_t bb, int64_t be) {
        with_adam_options(amsgrad, plain, [&](auto ams, auto pln) {
          adam_q8_piece<P, decltype(ams)::value, M, decltype(pln)::value>(call.rows[r], bb, be, scalars[r],
                                                                          call.rounding);
        });
      });
    });
  });
}

void multi_tensor_sgd_q8(const OptimCall& call, const SgdHyper& h) {
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_q8_param(call.param_dtype, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    const SgdScalars<float> s = sgd_scalars<float>(h, lr, divisor);
    const auto element = [](float& p, float g, float& buf, float first, const SgdScalars<float>& sc) {
      sgd_element<float>(p, g, buf, first, sc);
    };
    with_param_store<P>(call, kSgdMaster, [&](auto store) {
      constexpr int M = decltype(store)::value;
      for_each_piece(call.rows, row_block_offsets(call), kChunkBlocks, [&](int64_t, int64_t r, int64_t bb, int64_t be) {
        momentum_q8_piece<P, M>(call.rows[r], kSgdColumns, kSgdAbsmax, bb, be, s, element, call.rounding);
      });
    });
  });
  advance_buffer_ages(call, kSgdBufferAge);
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
