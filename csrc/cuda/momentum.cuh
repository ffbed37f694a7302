// The element loop SGD and LARS share on CUDA: p (or its master) and the
// momentum buffer move by Rule::element (ops/sgd.h, ops/lars.h). A Rule holds
// the optimizer's hyperparameters and provides kColumns (ops/sgd.h
// MomentumColumns), scalars<C>(row, device scalars) and a static element().
#pragma once
#include "../ops/sgd.h"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {

template <class P, class S, class Rule>
struct MomentumFunctor {
  using C = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  Rule rule;
  DeviceScalars d;
  __device__ bool skip() const { return d.skip(); }
  __device__ auto prepare(const TensorRow& r) const { return rule.template scalars<C>(r, d); }
  template <int V, class Scalars>
  __device__ void apply(const TensorRow& r, int64_t i, const Scalars& s) const {
    constexpr int param = Rule::kColumns.param, grad = Rule::kColumns.grad;
    constexpr int buffer = Rule::kColumns.buffer, master = Rule::kColumns.master, age = Rule::kColumns.age;
    C p[V], g[V], buf[V];
    // The age counter is advanced by a later kernel on the stream (advance_steps),
    // so every block of the row reads the same value.
    const C first = momentum_first_step(r, age) ? C(1) : C(0);
    load_param<V, P>(r, param, master, i, p);
    load_elems<V>(col<P>(r, grad), i, g);
    // A first step starts the buffer from d (torch clones it): nothing to read.
    if (s.has_momentum != C(0) && first == C(0)) load_elems<V>(col<S>(r, buffer), i, buf);
#pragma unroll
    for (int k = 0; k < V; ++k) Rule::element(p[k], g[k], buf[k], first, s);
    store_param<V, P>(r, param, master, i, p, d.rounding);
    if (s.has_momentum != C(0)) store_elems<V>(col<S>(r, buffer), i, buf);
  }
};

}  // namespace fusedopt::cuda
