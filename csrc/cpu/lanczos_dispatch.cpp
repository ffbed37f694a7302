#include "lanczos_cpu.h"

namespace fusedopt::cpu {
void lanczos_dots(const LanczosCall& c) { FO_SIMD_DISPATCH(lanczos_dots, c) }
void lanczos_orthogonalize(const LanczosCall& c) { FO_SIMD_DISPATCH(lanczos_orthogonalize, c) }
}  // namespace fusedopt::cpu
