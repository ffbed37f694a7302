// Deterministic per-row reductions on the CPU. The elements of all rows are
// cut into the same fixed chunks as every CPU driver (multi_tensor_cpu.h); each
// piece (one row's part of one chunk) writes its own partial sums (lane_sums),
// and a row's partials are then combined in the fixed order of ops/combine.h.
// Neither the thread count nor the SIMD level changes the bits of the result.
#pragma once
#include <vector>

#include "../ops/combine.h"
#include "multi_tensor_cpu.h"

namespace fusedopt::cpu {

// Lanes of the element loops: L independent accumulators, combined in a fixed
// order, so that the loop vectorizes without reassociating anything.
constexpr int kSumLanes = 16;

// Runs piece(row, begin, end, double out[K]) over every piece of the rows laid
// out by `off` (row_offsets: elements; or blocks of 8-bit states) in chunks of
// `chunk` and returns the per-row sums (n_rows * K, row-major). Empty rows sum to 0.
template <int K, class Piece>
std::vector<double> reduce_rows_over(const TensorRow* rows, int64_t n_rows, const std::vector<int64_t>& off,
                                     int64_t chunk, Piece&& piece) {
  std::vector<int64_t> base(static_cast<size_t>(n_rows) + 1, 0);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t pieces = rows[r].numel > 0 ? (off[r + 1] - 1) / chunk - off[r] / chunk + 1 : 0;
    base[r + 1] = base[r] + pieces;
  }
  std::vector<double> partial(static_cast<size_t>(base[n_rows]) * K, 0.0);
  for_each_piece(rows, off, chunk, [&](int64_t c, int64_t r, int64_t b, int64_t e) {
    piece(r, b, e, &partial[static_cast<size_t>(base[r] + c - off[r] / chunk) * K]);
  });
  std::vector<double> sums(static_cast<size_t>(n_rows) * K, 0.0);
  for (int64_t r = 0; r < n_rows; ++r)
    for (int k = 0; k < K; ++k)
      sums[r * K + k] =
          fixed_order_sum(base[r + 1] - base[r], [&](int64_t j) { return partial[(base[r] + j) * K + k]; });
  return sums;
}

// reduce_rows_over the elements of the rows, in the chunks of every CPU driver.
template <int K, class Piece>
std::vector<double> reduce_rows(const TensorRow* rows, int64_t n_rows, Piece&& piece) {
  return reduce_rows_over<K>(rows, n_rows, row_offsets(rows, n_rows), kCpuChunkElements, piece);
}

// Sums K quantities over elements [b, e): elem(i, C (&q)[K]) computes them
// for element i (and may write that element's outputs). Fixed lane order.
template <class C, int K, class Elem>
void lane_sums(int64_t b, int64_t e, Elem&& elem, double* out) {
  C acc[K][kSumLanes] = {};
  int64_t i = b;
  for (; i + kSumLanes <= e; i += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      C q[K];
      elem(i + l, q);
      for (int k = 0; k < K; ++k) acc[k][l] += q[k];
    }
  }
  for (int l = 0; i < e; ++i, ++l) {
    C q[K];
    elem(i, q);
    for (int k = 0; k < K; ++k) acc[k][l] += q[k];
  }
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int l = 0; l < kSumLanes; ++l) s += static_cast<double>(acc[k][l]);
    out[k] = s;
  }
}

}  // namespace fusedopt::cpu
