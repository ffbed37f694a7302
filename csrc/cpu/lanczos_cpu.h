// CPU drivers of the Lanczos vector work (math in ops/lanczos.h). Built once
// per SIMD level; the unqualified functions dispatch to the best level.
#pragma once
#include "../ops/lanczos.h"
#include "simd.h"

#define FO_LANCZOS_CPU_DECLS                 \
  void lanczos_dots(const LanczosCall& call); \
  void lanczos_orthogonalize(const LanczosCall& call);
FO_DECLARE_PER_SIMD(FO_LANCZOS_CPU_DECLS)

namespace fusedopt::cpu {
FO_LANCZOS_CPU_DECLS
constexpr int64_t kLanczosCpuChunk = 16384;  // elements per chunk: fixed, so sums do not depend on threads
}  // namespace fusedopt::cpu
