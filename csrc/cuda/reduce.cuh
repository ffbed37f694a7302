// Deterministic per-row reductions on CUDA, without atomics or host syncs.
// Pass A (reduce_kernel): one block per chunk, as elementwise_kernel, but the
// functor also adds K quantities per element into per-thread sums; the block
// adds them in a fixed tree and writes K partials to workspace[block]. Blocks
// of the plan are numbered in (tensor, chunk) order, so a row's partials are
// one contiguous run. Pass B (finalize_kernel): one thread per row adds its
// partials in chunk order and stores the K sums at the row's output pointer.
#pragma once
#include "multi_tensor.cuh"

namespace fusedopt::cuda {

// Number of chunks (= partials per quantity) of a reduction over these rows.
inline int64_t reduction_blocks(const TensorRow* rows, int64_t n_rows) {
  int64_t n = 0;
  for (int64_t r = 0; r < n_rows; ++r) n += (rows[r].numel + kChunkElements - 1) / kChunkElements;
  return n;
}

// F provides: kVec, Acc (accumulation type), skip(), prepare(row) -> scalars,
// apply<V>(row, i, scalars, Acc (&acc)[K]).
template <int K, class F>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(const __grid_constant__ LaunchTable t, const F f, double* partials, int64_t block_base) {
  if (f.skip()) return;
  using A = typename F::Acc;
  const BlockEntry be = t.blocks[blockIdx.x];
  const TensorRow& row = t.rows[be.row];
  const auto s = f.prepare(row);
  A acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = A(0);
  for_each_chunk_element<F::kVec>(row, be.chunk, [&](auto w, int64_t i) {
    f.template apply<decltype(w)::value>(row, i, s, acc);
  });

  __shared__ A sh[K][kThreads];
#pragma unroll
  for (int k = 0; k < K; ++k) sh[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
#pragma unroll
      for (int k = 0; k < K; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x < K) partials[(block_base + blockIdx.x) * K + threadIdx.x] = static_cast<double>(sh[threadIdx.x][0]);
}

struct FinalizeEntry {
  float* out;      // K floats; null: nothing to store
  int64_t start;   // first partial (block index) of the row
  int64_t count;   // its number of chunks
};
constexpr int kMaxFinalizeRows = 1200;
struct FinalizeTable { FinalizeEntry e[kMaxFinalizeRows]; };
static_assert(sizeof(FinalizeTable) + 64 <= 32764, "finalize table must fit the kernel parameter space");

template <int K>
__global__ void finalize_kernel(const __grid_constant__ FinalizeTable t, int n, const double* partials, bool take_sqrt,
                                const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || !t.e[i].out) return;
  const FinalizeEntry e = t.e[i];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t j = 0; j < e.count; ++j) s += partials[(e.start + j) * K + k];
    e.out[k] = static_cast<float>(take_sqrt ? sqrt(s) : s);
  }
}

// Both passes: row r's K sums land at rows[r].ptr[out_column]. `partials`
// holds reduction_blocks(rows) * K doubles.
template <int K, class F>
void launch_reduce(const TensorRow* rows, int64_t n_rows, cudaStream_t stream, const F& f, double* partials,
                   int out_column, bool take_sqrt, const float* found_inf) {
  int64_t block_base = 0;
  for (const PlannedLaunch& L : plan_launches(rows, n_rows)) {
    reduce_kernel<K, F><<<L.n_blocks, kThreads, 0, stream>>>(L.table, f, partials, block_base);
    block_base += L.n_blocks;
  }
  check(cudaGetLastError(), "reduce kernel launch");
  FinalizeTable t{};
  int n = 0;
  auto flush = [&] {
    if (n) finalize_kernel<K><<<(n + 127) / 128, 128, 0, stream>>>(t, n, partials, take_sqrt, found_inf);
    n = 0;
  };
  int64_t start = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t count = (rows[r].numel + kChunkElements - 1) / kChunkElements;
    t.e[n++] = FinalizeEntry{reinterpret_cast<float*>(rows[r].ptr[out_column]), start, count};
    start += count;
    if (n == kMaxFinalizeRows) flush();
  }
  flush();
  check(cudaGetLastError(), "finalize kernel launch");
}

}  // namespace fusedopt::cuda
