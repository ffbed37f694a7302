// CPU drivers of the per-tensor norms, LARS and LAMB. Built once per SIMD level
// (see simd.h); the unqualified functions dispatch to the best level.
#pragma once
#include "../ops/lamb.h"
#include "../ops/lars.h"
#include "../ops/norms.h"
#include "simd.h"

#define FO_NORM_SCALED_CPU_DECLS                                                        \
  void multi_tensor_norms(const NormsCall& call);                                       \
  void multi_tensor_lars(const OptimCall& call, const LarsHyper& h);                    \
  void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const double* grad_sq, \
                         int64_t n_grad_sq);
FO_DECLARE_PER_SIMD(FO_NORM_SCALED_CPU_DECLS)

namespace fusedopt::cpu {
FO_NORM_SCALED_CPU_DECLS
}  // namespace fusedopt::cpu
