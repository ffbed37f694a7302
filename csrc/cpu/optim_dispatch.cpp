#include "optim_cpu.h"

namespace fusedopt::cpu {
void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h) { FO_SIMD_DISPATCH(multi_tensor_sgd, call, h) }
void multi_tensor_adam(const OptimCall& call, const AdamHyper& h) { FO_SIMD_DISPATCH(multi_tensor_adam, call, h) }
void quantize8(const float* values, int64_t numel, uint8_t* codes, float* absmax, bool is_signed) {
  FO_SIMD_DISPATCH(quantize8, values, numel, codes, absmax, is_signed)
}
void dequantize8(const uint8_t* codes, const float* absmax, int64_t numel, float* values, bool is_signed) {
  FO_SIMD_DISPATCH(dequantize8, codes, absmax, numel, values, is_signed)
}
}  // namespace fusedopt::cpu
