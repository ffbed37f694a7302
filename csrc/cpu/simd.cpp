#include "simd.h"

#include <cstdlib>
#include <cstring>

namespace fusedopt::cpu {
namespace {

SimdLevel detect() {
  SimdLevel best = SimdLevel::kBaseline;
#if defined(FUSEDOPT_X86_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    best = SimdLevel::kAvx2;
  if (best == SimdLevel::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = SimdLevel::kAvx512;
#endif
  // The environment may only lower the level (for testing the other paths).
  if (const char* cap = std::getenv("FUSEDOPT_SIMD")) {
    SimdLevel want = best;
    if (!std::strcmp(cap, "baseline")) want = SimdLevel::kBaseline;
    if (!std::strcmp(cap, "avx2")) want = SimdLevel::kAvx2;
    if (want < best) best = want;
  }
  return best;
}

}  // namespace

SimdLevel simd_level() {
  static const SimdLevel level = detect();
  return level;
}

const char* simd_level_name() {
  switch (simd_level()) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace fusedopt::cpu
