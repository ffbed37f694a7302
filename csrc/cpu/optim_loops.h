// What the per-SIMD-level optimizer drivers share: the step counters of Adam
// and LAMB, and the element loop of SGD and LARS. Defined inside the level's
// namespace, so no instantiation is shared between SIMD levels.
#pragma once
#ifndef FUSEDOPT_SIMD_NS
#error "optim_loops.h belongs to the per-SIMD-level sources (CMake sets FUSEDOPT_SIMD_NS)"
#endif
#include <type_traits>
#include <vector>

#include "../ops/sgd.h"
#include "multi_tensor_cpu.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {

// The per-tensor scalars of this step: make(t) with t = a row's step counter
// + 1, the count torch.optim.Adam uses. Consecutive rows usually share t, so
// make (and its pow() calls) runs rarely. With `advance` the counter is stored
// as t (a split LAMB step advances it in its second call only).
template <class Scalars, class Make>
std::vector<Scalars> step_scalars(const OptimCall& call, int step_column, bool advance, Make&& make) {
  std::vector<Scalars> out(static_cast<size_t>(call.n_rows));
  float last = 0.0f;  // set by row 0
  Scalars cached{};
  constexpr int64_t kAhead = 8;  // the counters are scattered one-element tensors: overlap their misses
  for (int64_t r = 0; r < call.n_rows; ++r) {
    if (r + kAhead < call.n_rows) __builtin_prefetch(col<float>(call.rows[r + kAhead], step_column), 1);
    float* step = col<float>(call.rows[r], step_column);
    const float t = *step + 1.0f;
    if (advance) *step = t;
    if (r == 0 || t != last) cached = make(static_cast<double>(last = t));
    out[r] = cached;
  }
  return out;
}

// fn(std::bool_constant<amsgrad>, <plain>): the Adam drivers' loops compiled for
// each combination of these options (the param store: with_param_store).
template <class Fn>
void with_adam_options(bool amsgrad, bool plain, Fn&& fn) {
  auto b = [](bool on, auto&& next) {
    on ? next(std::true_type{}) : next(std::false_type{});
  };
  b(amsgrad, [&](auto a) { b(plain, [&](auto p) { fn(a, p); }); });
}

// After a step that ran (not skipped): every momentum-buffer age counter of
// the call counts it (ops/sgd.h momentum_first_step).
inline void advance_buffer_ages(const OptimCall& call, int age_column) {
  for (int64_t r = 0; r < call.n_rows; ++r)
    if (float* age = col<float>(call.rows[r], age_column)) *age += 1.0f;
}

// Elements [b, e) of an SGD or LARS row: p (or its master) and the momentum
// buffer move by element(p, g, buf, first, s) (ops/sgd.h, ops/lars.h). The
// scalars come by value, so the compiler knows no store in the loop changes them.
// kStore, sr: how p is stored (multi_tensor_cpu.h ParamStore).
template <class P, class S, class C, int kStore, class Scalars, class Element>
void momentum_piece(const TensorRow& r, const MomentumColumns& c, int64_t b, int64_t e, const Scalars s,
                    Element&& element, StochasticRounding sr) {
  const ParamIO<P, C, kStore> p(r, c.param, c.master, sr);
  const P* __restrict__ g = col<const P>(r, c.grad);
  S* __restrict__ buf = col<S>(r, c.buffer);
  const C first = momentum_first_step(r, c.age) ? C(1) : C(0);
  for (int64_t i = b; i < e; ++i) {
    C pv = p.load(i);
    C bv = buf ? load_as<S, C>(buf[i]) : C(0);
    element(pv, load_as<P, C>(g[i]), bv, first, s);
    p.store(i, pv);
    if (buf) store_as(buf[i], bv);
  }
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
