// Deterministic reductions on CUDA, without atomics or host syncs, in two
// pieces used by every reducing kernel:
// - block_sum: a block's per-thread sums joined in a fixed order (the norms,
//   LARS and LAMB reduce pass below and the Lanczos kernels);
// - combine_kernel: one warp per output adds that output's items (per-chunk
//   partials, or LAMB's per-grad sums) in the order of ops/combine.h, which the
//   CPU drivers follow too (fixed_order_sum).
// Per-row reductions (launch_reduce) are pass A, reduce_kernel: one block per
// chunk, as elementwise_kernel, but the functor also adds K quantities per
// element into per-thread sums and the block writes K fp64 partials to
// workspace[block]; blocks of the plan are numbered in (tensor, chunk) order,
// so a row's partials are one contiguous run. Pass B combines each row's run.
#pragma once
#include "../ops/combine.h"
#include "../ops/norms.h"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {

// The tree of ops/combine.h over the lanes of a warp: for off = 16, 8, 4, 2, 1
// lane l adds lane l + off. The total ends in lane 0; all 32 lanes take part.
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kCombineLanes / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// v[k] summed over the kBlockThreads threads of the block: warp_sum in every
// warp, then warp_sum over the warp sums (in warp order) in warp 0. Fixed
// order, so the same bits on every run. The totals are valid in thread 0.
// Every thread of the block must call it (it has barriers).
template <int kBlockThreads, int K, class A>
__device__ __forceinline__ void block_sum(A (&v)[K]) {
  static_assert(kBlockThreads % kCombineLanes == 0 && kBlockThreads <= kCombineLanes * kCombineLanes,
                "warp 0 adds the warp sums, one per lane");
  constexpr int kWarps = kBlockThreads / kCombineLanes;
  __shared__ A warp_sums[K][kWarps];
  const int warp = threadIdx.x / kCombineLanes, lane = threadIdx.x % kCombineLanes;
  __syncthreads();  // warp 0 may still be reading warp_sums of the previous call
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A s = warp_sum(v[k]);
    if (lane == 0) warp_sums[k][warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < kWarps ? warp_sums[k][lane] : A(0));
  }
}

template <int kBlockThreads, class A>
__device__ __forceinline__ A block_sum(A v) {
  A a[1] = {v};
  block_sum<kBlockThreads>(a);
  return a[0];
}

// One warp per output o < n_out: the f.count(o) items f.item(o, i) added in the
// order of ops/combine.h; lane 0 hands the total to f.finish(o, total).
// F (small: it travels in the parameter space) also provides skip().
constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / kCombineLanes;

template <class F>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ F f, int64_t n_out) {
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x) / kCombineLanes;
  const int lane = threadIdx.x % kCombineLanes;
  if (o >= n_out || f.skip()) return;  // a whole warp at a time: o is the same for its lanes
  const double total = warp_sum(combine_lane(f.count(o), lane, [&](int64_t i) { return f.item(o, i); }));
  if (lane == 0) f.finish(o, total);
}

template <class F>
void launch_combine(const F& f, int64_t n_out, cudaStream_t stream) {
  static_assert(sizeof(F) + sizeof(int64_t) <= kMaxParamBytes, "combine functor must fit the parameter space");
  if (n_out == 0) return;
  const int64_t blocks = (n_out + kCombineWarps - 1) / kCombineWarps;
  combine_kernel<F><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(f, n_out);
  check(cudaGetLastError(), "combine kernel launch");
}

// Number of chunks (= partials per quantity) of a reduction over these rows.
inline int64_t reduction_blocks(const TensorRow* rows, int64_t n_rows) {
  int64_t n = 0;
  for (int64_t r = 0; r < n_rows; ++r) n += (rows[r].numel + kChunkElements - 1) / kChunkElements;
  return n;
}

// F provides: kVec, Acc (accumulation type), skip(), prepare(row) -> scalars,
// apply<V>(row, i, scalars, Acc (&acc)[K]).
template <int K, class F, class Table>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
reduce_kernel(const __grid_constant__ Table t, const F f, double* partials, int64_t block_base) {
  if (f.skip()) return;
  using A = typename F::Acc;
  const BlockEntry be = t.blocks[blockIdx.x];
  const TensorRow& row = t.rows[be.row];
  const auto s = row_scalars(f, row);
  A acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = A(0);
  if constexpr (VisitsChunks<F>::value) {
    f.visit_chunk(row, be.chunk, s, acc);
  } else {
    for_each_chunk_element<F::kVec>(row, be.chunk, [&](auto w, int64_t i) {
      f.template apply<decltype(w)::value>(row, i, s, acc);
    });
  }
  block_sum<kThreads>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partials[(block_base + blockIdx.x) * K + k] = static_cast<double>(acc[k]);
  }
}

// Pass B: a row's K sums from its run of partials, stored at the row's output
// pointer as out_dtype (sqrt with take_sqrt). Output o is quantity o % K of
// entry o / K.
struct RowSumsEntry {
  void* out;       // K values of out_dtype; null: nothing to store
  int64_t start;   // first partial (block index) of the row
  int64_t count;   // its number of chunks
};
constexpr int kMaxRowSumsEntries = 1200;

template <int K>
struct RowSumsCombine {
  RowSumsEntry e[kMaxRowSumsEntries];
  const double* partials;
  const float* found_inf;  // set: the reduce pass skipped this step, so does this one
  int out_dtype;
  bool take_sqrt;
  __device__ bool skip() const { return found_inf && *found_inf != 0.0f; }
  __device__ int64_t count(int64_t o) const { return e[o / K].count; }
  __device__ double item(int64_t o, int64_t i) const { return partials[(e[o / K].start + i) * K + o % K]; }
  __device__ void finish(int64_t o, double s) const {
    if (e[o / K].out) store_norm(e[o / K].out, out_dtype, static_cast<int>(o % K), take_sqrt ? sqrt(s) : s);
  }
};

// Both passes: row r's K sums land at rows[r].ptr[out_column]. `partials`
// holds reduction_blocks(rows) * K doubles.
template <int K, class F>
void launch_reduce(const TensorRow* rows, int64_t n_rows, cudaStream_t stream, const F& f, double* partials,
                   int out_column, int out_dtype, bool take_sqrt, const float* found_inf) {
  static_assert(sizeof(LaunchTable) + sizeof(F) + 2 * sizeof(int64_t) <= kMaxParamBytes,
                "reduce kernel parameters must fit the parameter space");
  int64_t block_base = 0;
  for (const PlannedLaunch& L : plan_launches(rows, n_rows)) {
    with_launch_table(L, [&](const auto& table) {
      reduce_kernel<K, F, std::decay_t<decltype(table)>><<<L.n_blocks, kThreads, 0, stream>>>(table, f, partials,
                                                                                              block_base);
    });
    block_base += L.n_blocks;
  }
  check(cudaGetLastError(), "reduce kernel launch");
  RowSumsCombine<K> c{};
  c.partials = partials;
  c.found_inf = found_inf;
  c.out_dtype = out_dtype;
  c.take_sqrt = take_sqrt;
  int64_t n = 0, start = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t count = (rows[r].numel + kChunkElements - 1) / kChunkElements;
    c.e[n++] = RowSumsEntry{reinterpret_cast<void*>(rows[r].ptr[out_column]), start, count};
    start += count;
    if (n == kMaxRowSumsEntries || r + 1 == n_rows) {
      launch_combine(c, n * K, stream);
      n = 0;
    }
  }
}

}  // namespace fusedopt::cuda
