#include "optim_cpu.h"

namespace fusedopt::cpu {
void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h) { FO_SIMD_DISPATCH(multi_tensor_sgd, call, h) }
void multi_tensor_adam(const OptimCall& call, const AdamHyper& h) { FO_SIMD_DISPATCH(multi_tensor_adam, call, h) }
}  // namespace fusedopt::cpu
