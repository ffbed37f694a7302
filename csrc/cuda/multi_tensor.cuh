// Multi-tensor apply on CUDA. The host cuts the rows of a call into launches
// (common/chunk_table.h); each launch carries its rows and its block table in
// the kernel's parameter space (up to 32 KB from CUDA 12.1), so a launch needs
// no device allocation and no copy, and is safe to capture in a CUDA graph.
#pragma once
#include <type_traits>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../common/chunk_table.h"
#include "../common/packet_tier.h"
#include "../ops/common.h"
#include "../ops/stochastic_round.h"
#include "../ops/tensor_row.h"

namespace fusedopt::cuda {

// Bytes of kernel parameters a launch may carry (CUDA 12.1+ on Volta and newer;
// 32764 rather than 32768: the driver keeps a few bytes).
constexpr size_t kMaxParamBytes = 32764;

constexpr int64_t kChunkElements = 65536;
constexpr int kThreads = 512;
// Two blocks per SM at least: every optimizer kernel at >= 50% occupancy, at most
// 64 registers a thread (nvcc's own choice went to 84-104 for 16-bit Adam and
// 8-bit amsgrad: 30-36%; tools/cuda_report.sh).
constexpr int kMinBlocksPerSM = 2;
constexpr int kMaxLaunchRows = 240;
constexpr int kMaxLaunchBlocks = 1536;

// A launch's rows and its block table (one entry per CUDA block), at most
// kRows and kBlocks of them.
template <int kRows, int kBlocks>
struct TableOf {
  static constexpr int kMaxRows = kRows;
  static constexpr int kMaxBlocks = kBlocks;
  TensorRow rows[kRows];
  BlockEntry blocks[kBlocks];
};
using LaunchTable = TableOf<kMaxLaunchRows, kMaxLaunchBlocks>;
// Launches of a few rows and blocks (small models, Muon's groups, LAMB's and
// LARS's few-row passes, the last launch of a call) carry 1 152 bytes of table
// instead of 31 488: every launch copies its parameters, and a CUDA graph keeps
// them per node. Each kernel is built for both (with_launch_table).
using SmallLaunchTable = TableOf<8, 64>;
// 256 bytes stay free for the functor (hyperparameters and scalar pointers);
// each launcher also checks its own functor against the larger table.
static_assert(sizeof(LaunchTable) + 256 <= kMaxParamBytes, "launch table must fit the kernel parameter space");
static_assert(sizeof(SmallLaunchTable) == 1152, "8 rows of 80 bytes and 64 blocks of 8");

struct PlannedLaunch {
  std::vector<TensorRow> rows;
  std::vector<BlockEntry> blocks;
  int n_blocks;
  int n_rows;
  std::vector<uint8_t> row_is_last;

  template <class Table>
  Table table() const {
    Table t{};
    for (size_t i = 0; i < rows.size(); ++i) t.rows[i] = rows[i];
    for (size_t i = 0; i < blocks.size(); ++i) t.blocks[i] = blocks[i];
    return t;
  }
};

// launch(table): the launch's rows and blocks in the smaller table type that holds them.
template <class Launch>
void with_launch_table(const PlannedLaunch& L, Launch&& launch) {
  if (L.n_rows <= SmallLaunchTable::kMaxRows && L.n_blocks <= SmallLaunchTable::kMaxBlocks)
    launch(L.table<SmallLaunchTable>());
  else
    launch(L.table<LaunchTable>());
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt CUDA ") + what + ": " + cudaGetErrorString(e));
}

// Makes `device` current for the scope of a call and restores the caller's.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};

inline std::vector<PlannedLaunch> plan_launches(const TensorRow* rows, int64_t n_rows,
                                                int64_t chunk = kChunkElements) {
  std::vector<int64_t> numels(static_cast<size_t>(n_rows));
  for (int64_t r = 0; r < n_rows; ++r) numels[r] = rows[r].numel;
  std::vector<PlannedLaunch> launches;
  for (const LaunchPlan& p : build_chunk_table(numels.data(), n_rows, chunk, kMaxLaunchRows, kMaxLaunchBlocks)) {
    launches.emplace_back();
    PlannedLaunch& L = launches.back();
    for (int64_t r : p.rows) L.rows.push_back(rows[r]);
    L.blocks = p.blocks;
    L.n_blocks = static_cast<int>(p.blocks.size());
    L.n_rows = static_cast<int>(p.rows.size());
    L.row_is_last = p.row_is_last;
  }
  return launches;
}

// The optional device scalars of an OptimCall, read by every optimizer functor,
// and how it stores 16-bit params without master (store_param).
struct DeviceScalars {
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  StochasticRounding rounding;
  __device__ bool skip() const { return found_inf && *found_inf != 0.0f; }
  __device__ double lr(double fallback) const { return lr_ptr ? static_cast<double>(*lr_ptr) : fallback; }
  __device__ double divisor() const { return grad_scale ? static_cast<double>(*grad_scale) : 1.0; }
};

inline DeviceScalars device_scalars(const OptimCall& c) { return {c.lr_ptr, c.grad_scale, c.found_inf, c.rounding}; }

template <class T> __device__ __forceinline__ T* col(const TensorRow& r, int c) {
  return reinterpret_cast<T*>(r.ptr[c]);
}

// V consecutive elements moved as one packet in machine words of kWord bytes
// (uint4, uint2, uint32_t; the packet's size where smaller), so every access is
// one vector instruction. (A struct of V elements is split into 4- and 2-byte
// stores by nvcc where the store sits under a runtime condition: the master
// column, amsgrad; tools/cuda_report.sh.)
template <int kBytes> struct WordOf;
template <> struct WordOf<16> { using type = uint4; };
template <> struct WordOf<8> { using type = uint2; };
template <> struct WordOf<4> { using type = uint32_t; };
template <> struct WordOf<2> { using type = uint16_t; };

template <class T, int V, int kWord = 16>
struct PacketWords {
  static constexpr int kBytes = static_cast<int>(sizeof(T)) * V;
  static constexpr int kWordBytes = kBytes >= kWord ? kWord : kBytes;
  static constexpr int kWords = kBytes / kWordBytes;
  using Word = typename WordOf<kWordBytes>::type;
  static_assert(kBytes % kWordBytes == 0, "a packet is whole words");
};

template <int kWord, class T, int V>
__device__ __forceinline__ void load_words(const T* src, T (&v)[V]) {
  using W = PacketWords<T, V, kWord>;
  typename W::Word w[W::kWords];
#pragma unroll
  for (int k = 0; k < W::kWords; ++k) w[k] = reinterpret_cast<const typename W::Word*>(src)[k];
  memcpy(v, w, W::kBytes);  // a register reinterpretation
}

// One store instruction of a word: 16- and 8-byte words through PTX vector
// stores, which nvcc otherwise splits into 4-byte stores when the store is
// conditional (tools/cuda_report.sh: 16-bit Adam 21 4-byte STG per packet).
__device__ __forceinline__ void store_word(uint4* dst, uint4 w) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}
__device__ __forceinline__ void store_word(uint2* dst, uint2 w) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(dst), "r"(w.x), "r"(w.y) : "memory");
}
template <class W> __device__ __forceinline__ void store_word(W* dst, W w) { *dst = w; }

template <int kWord, class T, int V>
__device__ __forceinline__ void store_words(T* dst, const T (&v)[V]) {
  using W = PacketWords<T, V, kWord>;
  typename W::Word w[W::kWords];
  memcpy(w, v, W::kBytes);
#pragma unroll
  for (int k = 0; k < W::kWords; ++k) store_word(reinterpret_cast<typename W::Word*>(dst) + k, w[k]);
}

// A packet at its column's alignment tier (common/packet_tier.h): whole 16-, 8-
// or 4-byte words, else element by element.
template <class T, int V>
__device__ __forceinline__ void load_packet(const T* base, int64_t i, T (&v)[V]) {
  const int tier = packet_tier(reinterpret_cast<uintptr_t>(base), sizeof(T), V);
  if (tier == 16) load_words<16>(base + i, v);
  else if (tier == 8) load_words<8>(base + i, v);
  else if (tier == 4) load_words<4>(base + i, v);
  else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = base[i + k];
  }
}

template <class T, int V>
__device__ __forceinline__ void store_packet(T* base, int64_t i, const T (&v)[V]) {
  const int tier = packet_tier(reinterpret_cast<uintptr_t>(base), sizeof(T), V);
  if (tier == 16) store_words<16>(base + i, v);
  else if (tier == 8) store_words<8>(base + i, v);
  else if (tier == 4) store_words<4>(base + i, v);
  else {
#pragma unroll
    for (int k = 0; k < V; ++k) base[i + k] = v[k];
  }
}

template <int V, class T, class C>
__device__ __forceinline__ void load_elems(const T* base, int64_t i, C (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = load_as<T, C>(base[i]);
  } else {
    T raw[V];
    load_packet(base, i, raw);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = load_as<T, C>(raw[k]);
  }
}

template <int V, class T, class C>
__device__ __forceinline__ void store_elems(T* base, int64_t i, const C (&in)[V]) {
  if constexpr (V == 1) {
    store_as(base[i], in[0]);
  } else {
    T raw[V];
#pragma unroll
    for (int k = 0; k < V; ++k) store_as(raw[k], in[k]);
    store_packet(base, i, raw);
  }
}

// p as the math sees it: the fp32 master when the row has one, else the param.
template <int V, class P, class C>
__device__ __forceinline__ void load_param(const TensorRow& r, int param_column, int master_column, int64_t i,
                                           C (&p)[V]) {
  if (r.ptr[master_column]) load_elems<V>(col<float>(r, master_column), i, p);
  else load_elems<V>(col<P>(r, param_column), i, p);
}
// A row with master: the master and the param rounded to nearest from it. Else
// the param, rounded to nearest or, with sr.on and a 16-bit P, stochastically
// (ops/stochastic_round.h; i is the element's index in its tensor).
template <int V, class P, class C>
__device__ __forceinline__ void store_param(const TensorRow& r, int param_column, int master_column, int64_t i,
                                            const C (&p)[V], StochasticRounding sr = {}) {
  if (r.ptr[master_column]) store_elems<V>(col<float>(r, master_column), i, p);
  if constexpr (IsSixteenBit<P>::value) {
    if (sr.on && !r.ptr[master_column]) {
      const uint64_t key = rounding_row_key(call_seed_of(sr), r);
      P* base = col<P>(r, param_column);
      P raw[V];
#pragma unroll
      for (int k = 0; k < V; ++k) store_stochastic(raw[k], p[k], rounding_bits(key, i + k));
      if constexpr (V == 1) base[i] = raw[0];
      else store_packet(base, i, raw);
      return;
    }
  }
  store_elems<V>(col<P>(r, param_column), i, p);
}

template <int V> struct Width { static constexpr int value = V; };

// The elements of one block's chunk: visit(Width<V>{}, i) over V-wide packets
// (each column at its own alignment tier: load_packet), then visit(Width<1>{}, i)
// one element per thread for the tail. Blocks run kThreads threads.
template <int V, class Visit>
__device__ __forceinline__ void for_each_chunk_element(const TensorRow& row, int32_t chunk, Visit&& visit) {
  static_assert(kChunkElements % V == 0, "packets start at multiples of V elements: load_packet");
  const int64_t begin = static_cast<int64_t>(chunk) * kChunkElements;
  const int64_t end = begin + kChunkElements < row.numel ? begin + kChunkElements : row.numel;
  const int64_t vec_end = begin + (end - begin) / V * V;
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < vec_end; i += static_cast<int64_t>(kThreads) * V)
    visit(Width<V>{}, i);
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads) visit(Width<1>{}, i);
}

// Whether F's prepare() is costly enough to run once per block (F::kPrepareOnce).
template <class F, class = void> struct PrepareOnce : std::false_type {};
template <class F> struct PrepareOnce<F, std::void_t<decltype(F::kPrepareOnce)>>
    : std::bool_constant<F::kPrepareOnce> {};

// The row's scalars. With F::kPrepareOnce (Adam, LAMB: two double-precision pow()
// calls for the bias corrections, which every thread used to repeat before its
// first load) thread 0 computes them and the block reads them from shared memory;
// other functors' prepare() is a few multiplies, cheaper than the barrier and the
// registers it costs (tools/cuda_report.sh: SGD fp32 56 -> 58 registers with it).
template <class F>
__device__ __forceinline__ auto row_scalars(const F& f, const TensorRow& row) {
  if constexpr (PrepareOnce<F>::value) {
    using Scalars = decltype(f.prepare(row));
    static_assert(std::is_trivially_copyable_v<Scalars>, "per-row scalars travel through shared memory");
    __shared__ alignas(16) unsigned char bytes[sizeof(Scalars)];
    if (threadIdx.x == 0) *reinterpret_cast<Scalars*>(bytes) = f.prepare(row);
    __syncthreads();
    return *reinterpret_cast<const Scalars*>(bytes);
  } else {
    return f.prepare(row);
  }
}

// Whether F walks a block's chunk itself (F::kVisitsChunks: visit_chunk(row,
// chunk, scalars[, acc]); the 8-bit states, a warp per quantization block)
// instead of being handed its elements by for_each_chunk_element.
template <class F, class = void> struct VisitsChunks : std::false_type {};
template <class F> struct VisitsChunks<F, std::void_t<decltype(F::kVisitsChunks)>>
    : std::bool_constant<F::kVisitsChunks> {};

// One block per table entry.
// F provides: kVec, skip(), prepare(row) -> scalars, apply<V>(row, i, scalars) (or
// kVisitsChunks and visit_chunk), and optionally kPrepareOnce (row_scalars).
template <class F, class Table>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) elementwise_kernel(const __grid_constant__ Table t, const F f) {
  if (f.skip()) return;  // the same for every thread of the grid: no thread waits in row_scalars alone
  const BlockEntry be = t.blocks[blockIdx.x];
  const TensorRow& row = t.rows[be.row];
  const auto s = row_scalars(f, row);
  if constexpr (VisitsChunks<F>::value) {
    f.visit_chunk(row, be.chunk, s);
  } else {
    for_each_chunk_element<F::kVec>(row, be.chunk, [&](auto w, int64_t i) {
      f.template apply<decltype(w)::value>(row, i, s);
    });
  }
}

template <class F>
void launch_elementwise(const TensorRow* rows, int64_t n_rows, cudaStream_t stream, const F& f) {
  static_assert(sizeof(LaunchTable) + sizeof(F) <= kMaxParamBytes, "kernel parameters must fit the parameter space");
  for (const PlannedLaunch& L : plan_launches(rows, n_rows))
    with_launch_table(L, [&](const auto& table) {
      elementwise_kernel<F, std::decay_t<decltype(table)>><<<L.n_blocks, kThreads, 0, stream>>>(table, f);
    });
  check(cudaGetLastError(), "kernel launch");
}

// Per-tensor step counters (Adam, LAMB). The kernels of a step use t =
// counter + 1 added in fp32 (next_step): the value the counter will hold, and
// the t of the CPU drivers (cpu/optim_loops.h step_scalars). The counters are
// advanced after all chunks of the step ran, in a separate launch
// (advance_steps): chunks of one tensor may sit in different launches.
__device__ __forceinline__ double next_step(const TensorRow& r, int step_column) {
  return static_cast<double>(*reinterpret_cast<const float*>(r.ptr[step_column]) + 1.0f);
}

constexpr int kMaxStepsPerLaunch = 4000;
template <int kSteps> struct StepTableOf {
  static constexpr int kMaxSteps = kSteps;
  float* steps[kSteps];
};
using StepTable = StepTableOf<kMaxStepsPerLaunch>;  // 32 000 bytes
using SmallStepTable = StepTableOf<64>;             // 512 bytes: up to 64 counters
// advance_steps_kernel takes the table, an int count and the found_inf pointer.
static_assert(sizeof(StepTable) + 2 * sizeof(int64_t) <= kMaxParamBytes, "step table must fit the parameter space");

void advance_steps(const TensorRow* rows, int64_t n_rows, int step_column, const float* found_inf,
                   cudaStream_t stream);

}  // namespace fusedopt::cuda
