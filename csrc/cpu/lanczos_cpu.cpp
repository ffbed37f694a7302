// Compiled once per SIMD level (FUSEDOPT_SIMD_NS). Each chunk of the vectors is
// handled by one thread and writes its own partial sums with the fixed-order
// lanes of the other CPU reductions (reduce_cpu.h lane_sums); the partials are
// combined in the order of ops/combine.h, so results do not depend on the
// thread count.
#include <algorithm>
#include <cmath>

#include "../ops/combine.h"
#include "lanczos_cpu.h"
#include "reduce_cpu.h"
#include "thread_pool.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

// Elements [b, e) of chunk k of the n-element vectors.
inline void chunk_range(const LanczosCall& c, int64_t k, int64_t* b, int64_t* e) {
  *b = k * kLanczosCpuChunk;
  *e = std::min(c.n, *b + kLanczosCpuChunk);
}

template <class T>
void dots_impl(const LanczosCall& c) {
  const T* __restrict__ V = static_cast<const T*>(c.basis);
  const T* __restrict__ w = static_cast<const T*>(c.w);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosCpuChunk);
  parallel_for(chunks, [&](int64_t k) {
    int64_t b, e;
    chunk_range(c, k, &b, &e);
    // The chunk of w stays in cache while every basis row streams past it once.
    for (int64_t j = 0; j < c.m; ++j) {
      const T* __restrict__ row = V + j * c.n;
      lane_sums<double, 1>(b, e, [&](int64_t i, double(&q)[1]) {
        q[0] = static_cast<double>(row[i]) * static_cast<double>(w[i]);
      }, &c.partials[k * c.m + j]);
    }
  });
  for (int64_t j = 0; j < c.m; ++j)
    c.out[j] = fixed_order_sum(chunks, [&](int64_t k) { return c.partials[k * c.m + j]; });
}

template <class T>
void orthogonalize_impl(const LanczosCall& c) {
  const T* V = static_cast<const T*>(c.basis);
  T* w = static_cast<T*>(c.w);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosCpuChunk);
  parallel_for(chunks, [&](int64_t k) {
    int64_t b, e;
    chunk_range(c, k, &b, &e);
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
    lane_sums<double, 1>(0, len, [&](int64_t i, double(&q)[1]) {
      q[0] = lanczos_subtract_element<T>(w[b + i], s[i]);
    }, &c.partials[k]);
  });
  c.out[0] = std::sqrt(fixed_order_sum(chunks, [&](int64_t k) { return c.partials[k]; }));
}

}  // namespace

void lanczos_dots(const LanczosCall& c) {
  c.dtype == kFloat64 ? dots_impl<double>(c) : dots_impl<float>(c);
}
void lanczos_orthogonalize(const LanczosCall& c) {
  c.dtype == kFloat64 ? orthogonalize_impl<double>(c) : orthogonalize_impl<float>(c);
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
