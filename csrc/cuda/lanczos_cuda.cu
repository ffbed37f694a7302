// CUDA drivers of the Lanczos vector work (math in ops/lanczos.h). One block
// per fixed-size chunk writes its partial sums; a second small kernel adds the
// partials in chunk order. Block sums use a fixed tree, so results are the
// same bits on every run. Everything stays on the device: no host sync.
#include <cuda_runtime.h>

#include "../ops/lanczos.h"
#include "cuda_api.h"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {
namespace {

constexpr int kLanczosThreads = 256;
constexpr int kPerThread = 16;
constexpr int64_t kLanczosChunk = kLanczosThreads * kPerThread;  // 4096 elements per block

// Sum over the block in a fixed order: shuffle tree inside each warp, then the
// warp sums in warp order. Valid in thread 0.
__device__ double block_sum(double v, double* smem) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kLanczosThreads / 32; ++i) s += smem[i];
  return s;
}

template <class T>
__global__ void dots_kernel(const T* __restrict__ V, const T* __restrict__ w, int64_t m, int64_t n,
                            double* __restrict__ partials) {
  __shared__ double smem[kLanczosThreads / 32];
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
    s = block_sum(s, smem);
    if (threadIdx.x == 0) partials[blockIdx.x * m + j] = s;
  }
}

template <class T>
__global__ void orthogonalize_kernel(const T* __restrict__ V, T* __restrict__ w, const double* __restrict__ h,
                                     int64_t m, int64_t n, double* __restrict__ partials) {
  __shared__ double smem[kLanczosThreads / 32];
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
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = sq;
}

// out[j] = sum_k partials[k * width + j], k in order; sqrt of it when take_sqrt.
__global__ void combine_kernel(const double* __restrict__ partials, int64_t chunks, int64_t width,
                               double* __restrict__ out, bool take_sqrt) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= width) return;
  double s = 0.0;
  for (int64_t k = 0; k < chunks; ++k) s += partials[k * width + j];
  out[j] = take_sqrt ? sqrt(s) : s;
}

void combine(const LanczosCall& c, int64_t chunks, int64_t width, bool take_sqrt) {
  cudaStream_t st = static_cast<cudaStream_t>(c.stream);
  if (chunks == 0) {
    check(cudaMemsetAsync(c.out, 0, sizeof(double) * width, st), "lanczos memset");
    return;
  }
  const int threads = 128;
  combine_kernel<<<static_cast<unsigned>((width + threads - 1) / threads), threads, 0, st>>>(
      c.partials, chunks, width, c.out, take_sqrt);
  check(cudaGetLastError(), "lanczos combine launch");
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
