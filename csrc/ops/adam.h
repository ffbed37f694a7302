// Adam / AdamW per-element math: the one definition used by the CPU and CUDA
// drivers. The order of operations mirrors torch.optim.Adam's single-tensor
// path (lerp, mul+addcmul, addcdiv) so fp32 results agree to rounding.
#pragma once
#include <cmath>
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

// Columns of a TensorRow for Adam.
enum AdamColumn { kAdamParam = 0, kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, kAdamMaxExpAvgSq,
                  kAdamStep, kAdamMaster };

enum AdamFlag : int {
  kAdamAmsgrad = 1, kAdamMaximize = 2, kAdamDecoupled = 4, kAdamEpsInsideSqrt = 8,
};

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int flags;
};

// Everything a tensor's update needs that depends only on the step count.
template <class C> struct AdamScalars {
  C beta1_weight;   // 1 - beta1 (lerp weight)
  C beta2, one_minus_beta2, eps, weight_decay, decay_factor;
  C neg_step_size;  // -lr / (1 - beta1^t)
  C bc2;            // 1 - beta2^t
  C bc2_sqrt;
  C inv_scale_div;  // grad divisor (AMP scale) or 1
  bool amsgrad, maximize, decoupled, eps_inside, has_wd;
};

// `step` is the already incremented count t; `lr` the effective learning rate.
template <class C>
FO_HD AdamScalars<C> adam_scalars(const AdamHyper& h, double step, double lr, double grad_scale) {
  AdamScalars<C> s;
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  s.beta1_weight = static_cast<C>(1.0 - h.beta1);
  s.beta2 = static_cast<C>(h.beta2);
  s.one_minus_beta2 = static_cast<C>(1.0 - h.beta2);
  s.eps = static_cast<C>(h.eps);
  s.weight_decay = static_cast<C>(h.weight_decay);
  s.decay_factor = static_cast<C>(1.0 - lr * h.weight_decay);
  s.neg_step_size = static_cast<C>(-(lr / bc1));
  s.bc2 = static_cast<C>(bc2);
  s.bc2_sqrt = static_cast<C>(sqrt(bc2));
  s.inv_scale_div = static_cast<C>(grad_scale);
  s.amsgrad = h.flags & kAdamAmsgrad;
  s.maximize = h.flags & kAdamMaximize;
  s.decoupled = h.flags & kAdamDecoupled;
  s.eps_inside = h.flags & kAdamEpsInsideSqrt;
  s.has_wd = h.weight_decay != 0.0;
  return s;
}

// torch's lerp: exact at both ends, the branch picked by the weight.
template <class C> FO_HD C lerp(C a, C b, C w) {
  return (w < C(0.5)) ? a + w * (b - a) : b - (b - a) * (C(1) - w);
}

// One element. p, m, v, vmax are read-modify-write; g is the raw grad.
template <class C>
FO_HD void adam_element(C& p, C g, C& m, C& v, C& vmax, const AdamScalars<C>& s) {
  g = g / s.inv_scale_div;
  if (s.maximize) g = -g;
  if (s.has_wd) {
    if (s.decoupled) p = p * s.decay_factor;
    else g = g + s.weight_decay * p;
  }
  m = lerp(m, g, s.beta1_weight);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  C second = v;
  if (s.amsgrad) {
    vmax = vmax > v ? vmax : v;
    if (v != v) vmax = v;  // torch.maximum propagates NaN
    second = vmax;
  }
  C denom = s.eps_inside ? sqrt(second / s.bc2 + s.eps) : sqrt(second) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
}

}  // namespace fusedopt
