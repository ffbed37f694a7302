#include "muon_cpu.h"

namespace fusedopt::cpu {
void multi_tensor_muon_momentum(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  FO_SIMD_DISPATCH(multi_tensor_muon_momentum, call, h, update_dtype)
}
void multi_tensor_muon_apply(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  FO_SIMD_DISPATCH(multi_tensor_muon_apply, call, h, update_dtype)
}
void round_to_bf16_inplace(float* data, int64_t n) { FO_SIMD_DISPATCH(round_to_bf16_inplace, data, n) }
}  // namespace fusedopt::cpu
