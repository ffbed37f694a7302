// CPU drivers of Muon's two elementwise passes (ops/muon.h). Built once per
// SIMD level (see simd.h); the unqualified functions dispatch to the best level.
#pragma once
#include "../ops/muon.h"
#include "simd.h"

// update_dtype: DType of the update column (kFloat32, kBFloat16 or kFloat64).
#define FO_MUON_CPU_DECLS                                                               \
  void multi_tensor_muon_momentum(const OptimCall& call, const MuonHyper& h, int update_dtype); \
  void multi_tensor_muon_apply(const OptimCall& call, const MuonHyper& h, int update_dtype); \
  void round_to_bf16_inplace(float* data, int64_t n);
FO_DECLARE_PER_SIMD(FO_MUON_CPU_DECLS)

namespace fusedopt::cpu {
FO_MUON_CPU_DECLS
}  // namespace fusedopt::cpu
