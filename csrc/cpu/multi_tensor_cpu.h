// How the CPU drivers share one call's work among threads: the elements of all
// rows are laid end to end and cut into fixed-size chunks (independent of the
// thread count, so reductions over chunks stay deterministic). A chunk may span
// several small tensors or be one slice of a large one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops/common.h"
#include "../ops/stochastic_round.h"
#include "../ops/tensor_row.h"
#include "thread_pool.h"

namespace fusedopt::cpu {

constexpr int64_t kCpuChunkElements = 32768;

// Offsets of each row in the concatenated element space; size n_rows + 1.
inline std::vector<int64_t> row_offsets(const TensorRow* rows, int64_t n_rows) {
  std::vector<int64_t> off(static_cast<size_t>(n_rows) + 1, 0);
  for (int64_t r = 0; r < n_rows; ++r) off[r + 1] = off[r] + rows[r].numel;
  return off;
}

inline int64_t num_chunks(const std::vector<int64_t>& offsets, int64_t chunk) {
  return (offsets.back() + chunk - 1) / chunk;
}

// Rows ahead of the one being worked on whose first bytes are prefetched.
constexpr int64_t kPrefetchRows = 2;

// The first cache lines of every tensor of a row. Small tensors lie scattered
// over the heap: the hardware prefetcher cannot guess where the next row's
// start, and without this each row of a call over thousands of small tensors
// waits for several cache misses in turn. Large rows need only their start.
inline void prefetch_row(const TensorRow& r) {
  const int64_t lines = std::min<int64_t>((r.numel * 4 + 63) / 64, 4);
  for (int c = 0; c < kRowPointers; ++c) {
    if (r.ptr[c] == 0) continue;
    const char* p = reinterpret_cast<const char*>(r.ptr[c]);
    for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + 64 * l);
  }
}

// Calls fn(chunk_index, row, begin, end) for every non-empty piece of every
// chunk: elements [begin, end) of row `row` of `rows`. Chunks run in parallel;
// the pieces of one chunk run in row order on one thread.
template <class Fn>
void for_each_piece(const TensorRow* rows, const std::vector<int64_t>& offsets, int64_t chunk, Fn&& fn) {
  const int64_t total = offsets.back();
  const int64_t n_rows = static_cast<int64_t>(offsets.size()) - 1;
  parallel_for(num_chunks(offsets, chunk), [&](int64_t c) {
    int64_t start = c * chunk;
    const int64_t stop = std::min(start + chunk, total);
    int64_t row = std::upper_bound(offsets.begin(), offsets.end(), start) - offsets.begin() - 1;
    for (int64_t k = 1; k < kPrefetchRows && row + k < n_rows; ++k) prefetch_row(rows[row + k]);
    while (start < stop) {
      if (row + kPrefetchRows < n_rows && offsets[row + kPrefetchRows] < stop) prefetch_row(rows[row + kPrefetchRows]);
      const int64_t take = std::min(stop, offsets[row + 1]);
      if (take > start) fn(c, row, start - offsets[row], take - offsets[row]);
      start = take;
      ++row;
    }
  });
}

template <class T> inline T* col(const TensorRow& r, int c) { return reinterpret_cast<T*>(r.ptr[c]); }

// How a driver stores a param (ParamIO's kStore): rounded to nearest even;
// through its fp32 master (the param rounded to nearest from it); or, for a
// 16-bit param without master under stochastic rounding, rounded up or down at
// random (ops/stochastic_round.h). A bool true/false reads as master/nearest.
enum ParamStore : int { kStoreNearest = 0, kStoreMaster = 1, kStoreStochastic = 2 };

// A param as the optimizer math sees it: its fp32 master copy when the row has
// one (kStoreMaster), else the param itself; a store writes the master and the
// param rounded from it, or the param rounded as kStore says. i: the element's
// index in its tensor (never chunk-local: the random bits depend on it).
template <class P, class C, int kStore>
struct ParamIO {
  static constexpr bool kMaster = kStore == kStoreMaster;
  P* __restrict__ p;
  float* __restrict__ master;
  uint64_t key;  // kStoreStochastic: the row's rounding key
  ParamIO(const TensorRow& r, int param_column, int master_column, StochasticRounding sr = {})
      : p(col<P>(r, param_column)), master(col<float>(r, master_column)),
        key(kStore == kStoreStochastic ? rounding_row_key(call_seed_of(sr), r) : 0) {}
  C load(int64_t i) const { return kMaster ? static_cast<C>(master[i]) : load_as<P, C>(p[i]); }
  void store(int64_t i, C v) const {
    if (kMaster) master[i] = static_cast<float>(v);
    if constexpr (kStore == kStoreStochastic) store_stochastic(p[i], v, rounding_bits(key, i));
    else store_as(p[i], v);
  }
};

}  // namespace fusedopt::cpu
