#include "norm_scaled_cpu.h"

namespace fusedopt::cpu {
void multi_tensor_norms(const NormsCall& call) { FO_SIMD_DISPATCH(multi_tensor_norms, call) }
void multi_tensor_lars(const OptimCall& call, const LarsHyper& h) { FO_SIMD_DISPATCH(multi_tensor_lars, call, h) }
void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const double* grad_sq, int64_t n_grad_sq) {
  FO_SIMD_DISPATCH(multi_tensor_lamb, call, h, grad_sq, n_grad_sq)
}
}  // namespace fusedopt::cpu
