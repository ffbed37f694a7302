// Run-time choice of the CPU SIMD level. Kernel sources listed in CMake's
// fusedopt_simd_sources() are compiled once per level into the namespaces
// below; FO_SIMD_DISPATCH calls the best one the running CPU supports.
#pragma once

namespace fusedopt::cpu {

enum class SimdLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

SimdLevel simd_level();           // detected once; FUSEDOPT_SIMD=baseline|avx2|avx512 caps it
const char* simd_level_name();

}  // namespace fusedopt::cpu

// Declares the same declarations inside each SIMD namespace.
#if defined(FUSEDOPT_X86_VARIANTS)
#define FO_DECLARE_PER_SIMD(DECLS)                 \
  namespace fusedopt::cpu::baseline { DECLS }      \
  namespace fusedopt::cpu::avx2 { DECLS }          \
  namespace fusedopt::cpu::avx512 { DECLS }
#define FO_SIMD_DISPATCH(fn, ...)                                               \
  switch (::fusedopt::cpu::simd_level()) {                                      \
    case ::fusedopt::cpu::SimdLevel::kAvx512: return avx512::fn(__VA_ARGS__);   \
    case ::fusedopt::cpu::SimdLevel::kAvx2: return avx2::fn(__VA_ARGS__);       \
    default: return baseline::fn(__VA_ARGS__);                                  \
  }
#else
#define FO_DECLARE_PER_SIMD(DECLS) namespace fusedopt::cpu::baseline { DECLS }
#define FO_SIMD_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif
