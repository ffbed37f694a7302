// CUDA drivers of the Lanczos vector work (math in ops/lanczos.h). One block
// per fixed-size chunk writes its partial sums (block_sum); the combine kernel
// adds each output's partials in the order of ops/combine.h (reduce.cuh). Both
// orders are fixed, so results are the same bits on every run. Everything
// stays on the device: no host sync.
#include <cuda_runtime.h>

#include "../ops/lanczos.h"
#include "cuda_api.h"
#include "reduce.cuh"

namespace fusedopt::cuda {
namespace {

constexpr int kLanczosThreads = 256;
constexpr int kPerThread = 16;
constexpr int64_t kLanczosChunk = kLanczosThreads * kPerThread;  // 4096 elements per block

template <class T>
__global__ void dots_kernel(const T* __restrict__ V, const T* __restrict__ w, int64_t m, int64_t n,
                            double* __restrict__ partials) {
  const int64_t base = blockIdx.x * kLanczosChunk;
  double wr[kPerThread];  // this thread's elements of w, read once for all rows
#pragma unroll
  for (int t = 0; t < kPerThread; ++t) {
    const int64_t i = base + t * kLanczosThreads + threadIdx.x;
    wr[t] = i < n ? static_cast<double>(w[i]) : 0.0;
  }
  for (int64_t j = 0; j < m; ++j) {
    const T* row = V + j * n;
    double s = 0.0;
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int64_t i = base + t * kLanczosThreads + threadIdx.x;
      if (i < n) s += static_cast<double>(row[i]) * wr[t];
    }
    s = block_sum<kLanczosThreads>(s);
    if (threadIdx.x == 0) partials[blockIdx.x * m + j] = s;
  }
}

template <class T>
__global__ void orthogonalize_kernel(const T* __restrict__ V, T* __restrict__ w, const double* __restrict__ h,
                                     int64_t m, int64_t n, double* __restrict__ partials) {
  const int64_t base = blockIdx.x * kLanczosChunk;
  double sq = 0.0;
#pragma unroll 4
  for (int t = 0; t < kPerThread; ++t) {
    const int64_t i = base + t * kLanczosThreads + threadIdx.x;
    if (i >= n) break;
    double s = 0.0;
    for (int64_t j = 0; j < m; ++j) s += h[j] * static_cast<double>(V[j * n + i]);
    sq += lanczos_subtract_element<T>(w[i], s);
  }
  sq = block_sum<kLanczosThreads>(sq);
  if (threadIdx.x == 0) partials[blockIdx.x] = sq;
}

// out[j]: the partials[k * width + j] of all chunks k combined (sqrt with take_sqrt).
struct LanczosCombine {
  const double* partials;
  int64_t chunks, width;
  double* out;
  bool take_sqrt;
  __device__ bool skip() const { return false; }
  __device__ int64_t count(int64_t) const { return chunks; }
  __device__ double item(int64_t j, int64_t k) const { return partials[k * width + j]; }
  __device__ void finish(int64_t j, double s) const { out[j] = take_sqrt ? sqrt(s) : s; }
};

// With no chunks (n == 0) every output is 0.
void combine(const LanczosCall& c, int64_t chunks, int64_t width, bool take_sqrt) {
  launch_combine(LanczosCombine{c.partials, chunks, width, c.out, take_sqrt}, width,
                 static_cast<cudaStream_t>(c.stream));
}

}  // namespace

int64_t lanczos_chunk_elements() { return kLanczosChunk; }

void lanczos_dots(const LanczosCall& c) {
  if (c.m == 0) return;
  DeviceGuard guard(c.device);
  cudaStream_t st = static_cast<cudaStream_t>(c.stream);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosChunk);
  if (chunks > 0) {
    if (c.dtype == kFloat64)
      dots_kernel<double><<<static_cast<unsigned>(chunks), kLanczosThreads, 0, st>>>(
          static_cast<const double*>(c.basis), static_cast<const double*>(c.w), c.m, c.n, c.partials);
    else
      dots_kernel<float><<<static_cast<unsigned>(chunks), kLanczosThreads, 0, st>>>(
          static_cast<const float*>(c.basis), static_cast<const float*>(c.w), c.m, c.n, c.partials);
    check(cudaGetLastError(), "lanczos dots launch");
  }
  combine(c, chunks, c.m, false);
}

void lanczos_orthogonalize(const LanczosCall& c) {
  DeviceGuard guard(c.device);
  cudaStream_t st = static_cast<cudaStream_t>(c.stream);
  const int64_t chunks = lanczos_num_chunks(c.n, kLanczosChunk);
  if (chunks > 0) {
    if (c.dtype == kFloat64)
      orthogonalize_kernel<double><<<static_cast<unsigned>(chunks), kLanczosThreads, 0, st>>>(
          static_cast<const double*>(c.basis), static_cast<double*>(c.w), c.h, c.m, c.n, c.partials);
    else
      orthogonalize_kernel<float><<<static_cast<unsigned>(chunks), kLanczosThreads, 0, st>>>(
          static_cast<const float*>(c.basis), static_cast<float*>(c.w), c.h, c.m, c.n, c.partials);
    check(cudaGetLastError(), "lanczos orthogonalize launch");
  }
  combine(c, chunks, 1, true);
}

}  // namespace fusedopt::cuda
