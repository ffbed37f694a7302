// SGD with momentum per-element math (torch.optim.SGD semantics), shared by the
// CPU and CUDA drivers.
#pragma once
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

enum SgdColumn { kSgdParam = 0, kSgdGrad, kSgdMomentumBuffer, kSgdMaster };
enum SgdFlag : int { kSgdNesterov = 1, kSgdMaximize = 2 };

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  int flags;
};

template <class C> struct SgdScalars {
  C neg_lr, momentum, one_minus_dampening, weight_decay, grad_divisor;
  bool nesterov, maximize, has_wd, has_momentum;
};

template <class C>
FO_HD SgdScalars<C> sgd_scalars(const SgdHyper& h, double lr, double grad_scale) {
  SgdScalars<C> s;
  s.neg_lr = static_cast<C>(-lr);
  s.momentum = static_cast<C>(h.momentum);
  s.one_minus_dampening = static_cast<C>(1.0 - h.dampening);
  s.weight_decay = static_cast<C>(h.weight_decay);
  s.grad_divisor = static_cast<C>(grad_scale);
  s.nesterov = h.flags & kSgdNesterov;
  s.maximize = h.flags & kSgdMaximize;
  s.has_wd = h.weight_decay != 0.0;
  s.has_momentum = h.momentum != 0.0;
  return s;
}

// Momentum buffer update shared by SGD and LARS: on the first step the buffer
// is a copy of the update (torch clones the grad), afterwards an EMA-like sum.
// Returns the direction the param moves along.
template <class C>
FO_HD C momentum_direction(C d, C& buf, bool first, C momentum, C one_minus_dampening,
                           bool nesterov) {
  buf = first ? d : buf * momentum + one_minus_dampening * d;
  return nesterov ? d + momentum * buf : buf;
}

template <class C>
FO_HD void sgd_element(C& p, C g, C& buf, bool first, const SgdScalars<C>& s) {
  g = g / s.grad_divisor;
  if (s.maximize) g = -g;
  if (s.has_wd) g = g + s.weight_decay * p;
  if (s.has_momentum) g = momentum_direction(g, buf, first, s.momentum, s.one_minus_dampening, s.nesterov);
  p = p + s.neg_lr * g;
}

}  // namespace fusedopt
