// The one order in which partial sums are combined, on the CPU and on CUDA:
// per-tensor sums from their per-chunk partials (norms, LARS, LAMB, Lanczos)
// and LAMB's global grad norm from the per-tensor sums.
//
// The n items are dealt to kCombineLanes lanes (one CUDA warp): lane l adds
// items l, l + 32, l + 64, ... in index order, starting from +0. The 32 lane
// sums are then joined by a fixed tree: for off = 16, 8, 4, 2, 1, lane l adds
// lane l + off; the total ends in lane 0. On CUDA one warp does this with
// __shfl_down_sync (cuda/reduce.cuh combine_kernel, warp_sum); on the CPU
// fixed_order_sum below does the same additions, so both devices get the same
// bits from the same items. The order is independent of the thread count, and
// no lane ever adds more than ceil(n / 32) items in a row.
#pragma once
#include <cstdint>

#include "common.h"

namespace fusedopt {

constexpr int kCombineLanes = 32;

// Lane `lane`'s share of the n items item(0..n-1).
template <class Item>
FO_HD double combine_lane(int64_t n, int lane, const Item& item) {
  double s = 0.0;
  for (int64_t i = lane; i < n; i += kCombineLanes) s += item(i);
  return s;
}

// The tree over the lane sums, in place; returns lane 0 (the total).
inline double combine_tree(double (&lanes)[kCombineLanes]) {
  for (int off = kCombineLanes / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) lanes[l] += lanes[l + off];
  return lanes[0];
}

// Host: the total of item(0..n-1) in exactly the order a CUDA combine warp adds them.
template <class Item>
double fixed_order_sum(int64_t n, const Item& item) {
  // One item (a tensor of one chunk, the common case): lane 0 holds +0 + item
  // and every other lane +0, which the tree adds without changing a bit.
  if (n <= 1) return n == 1 ? 0.0 + item(0) : 0.0;
  double lanes[kCombineLanes];
  for (int l = 0; l < kCombineLanes; ++l) lanes[l] = combine_lane(n, l, item);
  return combine_tree(lanes);
}

// Host: x[0] + ... + x[(n - 1) * stride] in the fixed order.
inline double fixed_order_sum(const double* x, int64_t n, int64_t stride = 1) {
  return fixed_order_sum(n, [=](int64_t i) { return x[i * stride]; });
}

}  // namespace fusedopt
