// CPU drivers of the elementwise optimizers. Each is built once per SIMD level
// (see simd.h); the unqualified functions dispatch to the best level.
#pragma once
#include <type_traits>

#include "../ops/adam.h"
#include "../ops/sgd.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

// quantize8/dequantize8: host conversions between fp32 values and 8-bit
// blockwise states (checkpoint loading, dequantized_state_dict), through the
// same encoder and decoder as the kernels.
#define FO_OPTIM_CPU_DECLS                                                                         \
  void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h);                                 \
  void multi_tensor_adam(const OptimCall& call, const AdamHyper& h);                               \
  void quantize8(const float* values, int64_t numel, uint8_t* codes, float* absmax, bool is_signed); \
  void dequantize8(const uint8_t* codes, const float* absmax, int64_t numel, float* values, bool is_signed);
FO_DECLARE_PER_SIMD(FO_OPTIM_CPU_DECLS)

namespace fusedopt::cpu {
FO_OPTIM_CPU_DECLS
// True when an AMP found_inf flag says to skip this step entirely.
inline bool step_is_skipped(const OptimCall& call) { return call.found_inf && *call.found_inf != 0.0f; }
inline double effective_lr(const OptimCall& call, double lr) { return call.lr_ptr ? *call.lr_ptr : lr; }
inline double grad_divisor(const OptimCall& call) { return call.grad_scale ? *call.grad_scale : 1.0; }
// True when any row has a master-weight pointer in `column` (then all have).
inline bool any_master(const OptimCall& call, int column) {
  for (int64_t r = 0; r < call.n_rows; ++r)
    if (call.rows[r].ptr[column]) return true;
  return false;
}
// fn(std::integral_constant<int, kStore>): how this call stores params P
// (multi_tensor_cpu.h ParamStore) as a compile-time switch, so the element
// loops stay branch-free. Stochastic rounding applies to 16-bit rows without
// master only (Python refuses it with master weights).
template <class P, class Fn>
void with_param_store(const OptimCall& call, int master_column, Fn&& fn) {
  if (any_master(call, master_column)) return fn(std::integral_constant<int, kStoreMaster>{});
  if constexpr (IsSixteenBit<P>::value) {
    if (call.rounding.on) return fn(std::integral_constant<int, kStoreStochastic>{});
  }
  fn(std::integral_constant<int, kStoreNearest>{});
}
}  // namespace fusedopt::cpu
