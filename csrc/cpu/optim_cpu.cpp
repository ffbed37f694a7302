// Compiled once per SIMD level with FUSEDOPT_SIMD_NS set by CMake. The loops
// are plain scalar code over restrict pointers; the compiler vectorizes them
// for the level's instruction set.
#include <vector>

#include "../ops/dispatch.h"
#include "multi_tensor_cpu.h"
#include "optim_cpu.h"
#include "optim_loops.h"
#include "quant8_loops.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

template <class P, class S, bool kAmsgrad, int kStore, bool kPlain, class C>
void adam_piece(const TensorRow& r, int64_t b, int64_t e, const AdamScalars<C> s, StochasticRounding sr) {
  const ParamIO<P, C, kStore> p(r, kAdamParam, kAdamMaster, sr);
  const P* __restrict__ g = col<P>(r, kAdamGrad);
  S* __restrict__ m = col<S>(r, kAdamExpAvg);
  S* __restrict__ v = col<S>(r, kAdamExpAvgSq);
  S* __restrict__ vmax = col<S>(r, kAdamMaxExpAvgSq);
  for (int64_t i = b; i < e; ++i) {
    C pv = p.load(i);
    C mv = load_as<S, C>(m[i]), vv = load_as<S, C>(v[i]);
    C vmaxv = kAmsgrad ? load_as<S, C>(vmax[i]) : C(0);
    adam_element<C, kPlain>(pv, load_as<P, C>(g[i]), mv, vv, vmaxv, s);
    p.store(i, pv);
    store_as(m[i], mv);
    store_as(v[i], vv);
    if (kAmsgrad) store_as(vmax[i], vmaxv);
  }
}

}  // namespace

void multi_tensor_adam(const OptimCall& call, const AdamHyper& h) {
  if (step_is_skipped(call)) return;
  if (call.state_dtype == kInt8) return multi_tensor_adam_q8(call, h);
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    const std::vector<AdamScalars<C>> scalars = step_scalars<AdamScalars<C>>(
        call, kAdamStep, true, [&](double t) { return adam_scalars<C>(h, t, lr, divisor); });
    const bool amsgrad = h.flags & kAdamAmsgrad;
    const bool plain = adam_is_plain(h, divisor);
    with_param_store<P>(call, kAdamMaster, [&](auto store) {
      constexpr int M = decltype(store)::value;
      for_each_piece(call.rows, row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) {
        with_adam_options(amsgrad, plain, [&](auto ams, auto pln) {
          adam_piece<P, S, decltype(ams)::value, M, decltype(pln)::value>(call.rows[r], b, e, scalars[r],
                                                                          call.rounding);
        });
      });
    });
  });
}

void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h) {
  if (step_is_skipped(call)) return;
  // Without momentum there is no buffer: an 8-bit call is a plain one.
  if (call.state_dtype == kInt8 && h.momentum != 0.0) return multi_tensor_sgd_q8(call, h);
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_param_state(call.param_dtype, call.state_dtype == kInt8 ? kFloat32 : call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    const SgdScalars<C> s = sgd_scalars<C>(h, lr, divisor);
    const auto element = [](C& p, C g, C& buf, C first, const SgdScalars<C>& sc) {
      sgd_element<C>(p, g, buf, first, sc);
    };
    with_param_store<P>(call, kSgdMaster, [&](auto store) {
      for_each_piece(call.rows, row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) {
        momentum_piece<P, S, C, decltype(store)::value>(call.rows[r], kSgdColumns, b, e, s, element, call.rounding);
      });
    });
  });
  advance_buffer_ages(call, kSgdBufferAge);
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
