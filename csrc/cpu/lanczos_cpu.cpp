// Compiled once per SIMD level (FUSEDOPT_SIMD_NS). Each chunk of the vectors is
// handled by one thread and writes its own partial sums; the final sums add
// the partials in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>

#include "lanczos_cpu.h"
#include "thread_pool.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

// Sum of x_i * y_i in fp64 with kLanes independent accumulators, combined in a
// fixed order: a fixed summation order that the compiler can still vectorize
// (one accumulator per SIMD lane) without -ffast-math reassociation.
constexpr int kLanes = 8;
template <class A, class B>
double lane_dot(const A* __restrict__ x, const B* __restrict__ y, int64_t len) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(x[i + l]) * static_cast<double>(y[i + l]);
  for (; i < len; ++i) acc[i % kLanes] += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <class T>
void dots_impl(const LanczosCall& c) {
  const T* __restrict__ V = static_cast<const T*>(c.basis);
  const T* __restrict__ w = static_cast<const T*>(c.w);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosCpuChunk);
  parallel_for(chunks, [&](int64_t k) {
    const int64_t b = k * kLanczosCpuChunk, e = std::min(c.n, b + kLanczosCpuChunk);
    // The chunk of w stays in cache while every basis row streams past it once.
    for (int64_t j = 0; j < c.m; ++j) {
      c.partials[k * c.m + j] = lane_dot(V + j * c.n + b, w + b, e - b);
    }
  });
  for (int64_t j = 0; j < c.m; ++j) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += c.partials[k * c.m + j];
    c.out[j] = s;
  }
}

template <class T>
void orthogonalize_impl(const LanczosCall& c) {
  const T* V = static_cast<const T*>(c.basis);
  T* w = static_cast<T*>(c.w);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosCpuChunk);
  parallel_for(chunks, [&](int64_t k) {
    const int64_t b = k * kLanczosCpuChunk, e = std::min(c.n, b + kLanczosCpuChunk);
    // s_i = sum_j h_j V_ji, accumulated row by row in a chunk-local buffer so
    // every row of V is read sequentially (and vectorized) exactly once.
    double s[kLanczosCpuChunk];
    const int64_t len = e - b;
    for (int64_t i = 0; i < len; ++i) s[i] = 0.0;
    for (int64_t j = 0; j < c.m; ++j) {
      const T* __restrict__ row = V + j * c.n + b;
      const double hj = c.h[j];
      for (int64_t i = 0; i < len; ++i) s[i] += hj * static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < len; ++i) s[i] = lanczos_subtract_element<T>(w[b + i], s[i]);
    double sq[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < len; ++i) sq[i % kLanes] += s[i];
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += sq[l];
    c.partials[k] = total;
  });
  double s = 0.0;
  for (int64_t k = 0; k < chunks; ++k) s += c.partials[k];
  c.out[0] = std::sqrt(s);
}

}  // namespace

void lanczos_dots(const LanczosCall& c) {
  c.dtype == kFloat64 ? dots_impl<double>(c) : dots_impl<float>(c);
}
void lanczos_orthogonalize(const LanczosCall& c) {
  c.dtype == kFloat64 ? orthogonalize_impl<double>(c) : orthogonalize_impl<float>(c);
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
