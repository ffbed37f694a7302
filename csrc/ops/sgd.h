// SGD with momentum per-element math (torch.optim.SGD semantics), shared by the
// CPU and CUDA drivers.
#pragma once
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

// kSgdBufferAge (optional): see momentum_first_step. kSgdAbsmax (8-bit state only,
// ops/quant8.h): fp32 [1, blocks] block scales of the momentum buffer.
enum SgdColumn { kSgdParam = 0, kSgdGrad, kSgdMomentumBuffer, kSgdMaster, kSgdBufferAge, kSgdAbsmax };
enum SgdFlag : int { kSgdNesterov = 1, kSgdMaximize = 2 };

// Where SGD and LARS rows keep the tensors of the momentum loop they share
// (cpu/optim_loops.h momentum_piece, cuda/momentum.cuh MomentumFunctor).
struct MomentumColumns { int param, grad, buffer, master, age; };
constexpr MomentumColumns kSgdColumns{kSgdParam, kSgdGrad, kSgdMomentumBuffer, kSgdMaster, kSgdBufferAge};

// Whether this step starts a row's momentum buffer from its update (torch's
// first step). A buffer the call created comes with a counter on the device
// (the age column: the steps that wrote the buffer, advanced after each step
// that was not skipped), so that a step AMP skips (found_inf) leaves the next
// one a first step, as if it never happened, with no host read. A row without
// a counter uses its first-step flag.
FO_HD bool momentum_first_step(const TensorRow& r, int age_column) {
  const float* age = reinterpret_cast<const float*>(r.ptr[age_column]);
  return age != nullptr ? *age == 0.0f : (r.flags & kRowFirstStep) != 0;
}

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  int flags;
};

template <class C> struct SgdScalars {
  C neg_lr, momentum, one_minus_dampening, weight_decay, grad_divisor;
  C nesterov, maximize, has_wd, has_momentum;  // 0/1: selects on them vectorize
};

template <class C>
FO_HD SgdScalars<C> sgd_scalars(const SgdHyper& h, double lr, double grad_scale) {
  SgdScalars<C> s;
  s.neg_lr = static_cast<C>(-lr);
  s.momentum = static_cast<C>(h.momentum);
  s.one_minus_dampening = static_cast<C>(1.0 - h.dampening);
  s.weight_decay = static_cast<C>(h.weight_decay);
  s.grad_divisor = static_cast<C>(grad_scale);
  s.nesterov = (h.flags & kSgdNesterov) ? C(1) : C(0);
  s.maximize = (h.flags & kSgdMaximize) ? C(1) : C(0);
  s.has_wd = (h.weight_decay != 0.0) ? C(1) : C(0);
  s.has_momentum = (h.momentum != 0.0) ? C(1) : C(0);
  return s;
}

// Momentum buffer update shared by SGD and LARS: on the first step the buffer
// is a copy of the update (torch clones the grad), afterwards an EMA-like sum.
// Returns the direction the param moves along. Selects, not branches, so the
// CPU loops vectorize.
template <class C>
FO_HD C momentum_direction(C d, C& buf, C first, C momentum, C one_minus_dampening, C nesterov) {
  buf = first != C(0) ? d : buf * momentum + one_minus_dampening * d;
  return nesterov != C(0) ? d + momentum * buf : buf;
}

// p -= lr * (the momentum direction of d, with buf updated, when there is
// momentum; else d itself). Shared by SGD and LARS; S: their scalars.
template <class C, class S>
FO_HD void momentum_step(C& p, C d, C& buf, C first, const S& s) {
  C b = buf;
  const C dir = momentum_direction(d, b, first, s.momentum, s.one_minus_dampening, s.nesterov);
  buf = s.has_momentum != C(0) ? b : buf;
  d = s.has_momentum != C(0) ? dir : d;
  p = p + s.neg_lr * d;
}

template <class C>
FO_HD void sgd_element(C& p, C g, C& buf, C first, const SgdScalars<C>& s) {
  g = g / s.grad_divisor;
  g = s.maximize != C(0) ? -g : g;
  g = s.has_wd != C(0) ? g + s.weight_decay * p : g;
  momentum_step(p, g, buf, first, s);
}

}  // namespace fusedopt
