// LARS (You et al. 2017) per-tensor trust ratio and per-element update, shared
// by the CPU and CUDA drivers. Momentum is exactly torch.optim.SGD's
// (momentum_step from sgd.h).
#pragma once
#include <cmath>
#include "common.h"
#include "sgd.h"
#include "tensor_row.h"

namespace fusedopt {

// Columns of a LARS row. kLarsNorms: double[2] = {sum p^2, sum g^2} (raw, still
// AMP-scaled grad; fp64 whatever the param dtype, so fp64 params get exact
// ratios), written by the norms pass of the same call. kLarsMaster:
// optional fp32 master copy of a 16-bit param; when present the math (norms
// included) reads and writes it and the param gets it rounded to nearest even.
// kLarsBufferAge (optional): sgd.h momentum_first_step. kLarsAbsmax (8-bit state
// only, ops/quant8.h): fp32 [1, blocks] block scales of the momentum buffer.
enum LarsColumn { kLarsParam = 0, kLarsGrad, kLarsMomentumBuffer, kLarsNorms, kLarsMaster, kLarsBufferAge,
                  kLarsAbsmax };
constexpr MomentumColumns kLarsColumns{kLarsParam, kLarsGrad, kLarsMomentumBuffer, kLarsMaster, kLarsBufferAge};
enum LarsFlag : int {
  kLarsNesterov = 1, kLarsTrustClip = 2, kLarsAlwaysAdapt = 4,
  // A step split in two calls, so that sharded (FSDP2) norms can be all-reduced
  // in between: the first only writes the norms column, the second reads it
  // instead of running the norms pass.
  kLarsNormsOnly = 8, kLarsNormsGiven = 16,
};

struct LarsHyper {
  double lr, momentum, dampening, weight_decay, trust_coeff, eps;
  int flags;
};

// Whether the step scales by a trust ratio (and so needs the norms pass).
FO_HD bool lars_adapts(const LarsHyper& h) { return h.weight_decay != 0.0 || (h.flags & kLarsAlwaysAdapt); }

// r = trust_coeff * |p| / (|g| + wd |p| + eps); 1 where |p| or |g| is 0;
// with trust_clip min(r / lr, 1). `g_sq` is of the scaled grad: |g| = sqrt(g_sq) / grad_scale.
FO_HD double lars_trust_ratio(const LarsHyper& h, double lr, double p_sq, double g_sq, double grad_scale) {
  if (!lars_adapts(h)) return 1.0;
  const double pn = sqrt(p_sq), gn = sqrt(g_sq) / grad_scale;
  double r = (pn > 0.0 && gn > 0.0) ? h.trust_coeff * pn / (gn + h.weight_decay * pn + h.eps) : 1.0;
  if (h.flags & kLarsTrustClip) r = r / lr < 1.0 ? r / lr : 1.0;
  return r;
}

template <class C> struct LarsScalars {
  C neg_lr, momentum, one_minus_dampening, weight_decay, grad_divisor, ratio;
  C nesterov, has_wd, has_momentum;  // 0/1: selects on them vectorize
};

template <class C>
FO_HD LarsScalars<C> lars_scalars(const LarsHyper& h, double lr, double grad_scale, double ratio) {
  LarsScalars<C> s;
  s.neg_lr = static_cast<C>(-lr);
  s.momentum = static_cast<C>(h.momentum);
  s.one_minus_dampening = static_cast<C>(1.0 - h.dampening);
  s.weight_decay = static_cast<C>(h.weight_decay);
  s.grad_divisor = static_cast<C>(grad_scale);
  s.ratio = static_cast<C>(ratio);
  s.nesterov = (h.flags & kLarsNesterov) ? C(1) : C(0);
  s.has_wd = h.weight_decay != 0.0 ? C(1) : C(0);
  s.has_momentum = h.momentum != 0.0 ? C(1) : C(0);
  return s;
}

// d = (g + wd p) r; buf/direction as torch SGD; p -= lr * direction.
template <class C>
FO_HD void lars_element(C& p, C g, C& buf, C first, const LarsScalars<C>& s) {
  g = g / s.grad_divisor;
  C d = s.has_wd != C(0) ? g + s.weight_decay * p : g;
  momentum_step(p, d * s.ratio, buf, first, s);
}

}  // namespace fusedopt
