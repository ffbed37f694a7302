// Adam / AdamW per-element math: the one definition used by the CPU and CUDA
// drivers. The order of operations mirrors torch.optim.Adam's single-tensor
// path (lerp, mul+addcmul, addcdiv) so fp32 results agree to rounding.
#pragma once
#include <cmath>
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

// Columns of a TensorRow for Adam.
// kAdamAbsmax (8-bit state only, ops/quant8.h): fp32 [k, blocks] block scales of
// exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq, in that order.
enum AdamColumn { kAdamParam = 0, kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, kAdamMaxExpAvgSq,
                  kAdamStep, kAdamMaster, kAdamAbsmax };

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
  C grad_divisor;   // what the raw grad is divided by: the AMP scale, or 1
  // Options as 0/1 in the compute type: selects on them vectorize (bools do not).
  C amsgrad, maximize, coupled_wd, eps_inside;
};

// Whether adam_element<C, true> applies: no AMP divisor and eps outside the sqrt.
FO_HD bool adam_is_plain(const AdamHyper& h, double grad_scale) {
  return grad_scale == 1.0 && !(h.flags & kAdamEpsInsideSqrt);
}

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
  const bool decoupled = h.flags & kAdamDecoupled;
  // 1 exactly when no decoupled decay applies, so p * decay_factor == p.
  s.decay_factor = static_cast<C>(decoupled && h.weight_decay != 0.0 ? 1.0 - lr * h.weight_decay : 1.0);
  s.neg_step_size = static_cast<C>(-(lr / bc1));
  s.bc2 = static_cast<C>(bc2);
  s.bc2_sqrt = static_cast<C>(sqrt(bc2));
  s.grad_divisor = static_cast<C>(grad_scale);
  s.amsgrad = (h.flags & kAdamAmsgrad) ? C(1) : C(0);
  s.maximize = (h.flags & kAdamMaximize) ? C(1) : C(0);
  s.coupled_wd = (!decoupled && h.weight_decay != 0.0) ? C(1) : C(0);
  s.eps_inside = (h.flags & kAdamEpsInsideSqrt) ? C(1) : C(0);
  return s;
}

// torch's lerp: exact at both ends, the branch picked by the weight.
template <class C> FO_HD C lerp(C a, C b, C w) {
  return (w < C(0.5)) ? a + w * (b - a) : b - (b - a) * (C(1) - w);
}

// One element. p, m, v, vmax are read-modify-write; g is the raw grad.
// Options are selects, not branches, so the CPU loops vectorize; a disabled
// option selects the untouched value, which keeps results exact.
// kPlain: the caller knows grad_divisor is 1 and eps is outside the sqrt, so the
// division by 1 and the other denominator (a division and a square root, which
// a select computes too) are left out; the results are the same bits.
template <class C, bool kPlain = false>
FO_HD void adam_element(C& p, C g, C& m, C& v, C& vmax, const AdamScalars<C>& s) {
  if constexpr (!kPlain) g = g / s.grad_divisor;
  g = s.maximize != C(0) ? -g : g;
  g = s.coupled_wd != C(0) ? g + s.weight_decay * p : g;
  p = p * s.decay_factor;  // exactly 1 unless decoupled decay is on
  m = lerp(m, g, s.beta1_weight);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  // torch.maximum: the larger value, NaN if either is NaN.
  const C mx = ((vmax > v) | (vmax != vmax)) ? vmax : v;
  vmax = s.amsgrad != C(0) ? mx : vmax;
  const C second = s.amsgrad != C(0) ? vmax : v;
  const C outside = fo_sqrt(second) / s.bc2_sqrt + s.eps;
  C denom = outside;
  if constexpr (!kPlain) denom = s.eps_inside != C(0) ? fo_sqrt(second / s.bc2 + s.eps) : outside;
  p = p + s.neg_step_size * m / denom;
}

}  // namespace fusedopt
