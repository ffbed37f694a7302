// LAMB (You et al. 2019) per-element math, shared by the CPU and CUDA drivers.
// A step runs as: (1) the global grad norm (norms.h, all grads of the device),
// (2) the moment pass: m, v updated, and per tensor sum p'^2 and sum u^2, where
// p' is p after decoupled decay and u the Adam direction, (3) the apply pass:
// u is recomputed from the new m, v and p moves by -lr * r * u.
#pragma once
#include <cmath>
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

// kLambNorms: double[2] = {sum p'^2, sum u^2} (fp64 whatever the param dtype),
// written by the moment pass.
// kLambMaster: optional fp32 master copy of a 16-bit param; when present p
// (also in the norms) is read from and written to it, and the param gets it
// rounded to nearest even.
// kLambAbsmax (8-bit state only, ops/quant8.h): fp32 [2, blocks] block scales of
// exp_avg and exp_avg_sq.
enum LambColumn { kLambParam = 0, kLambGrad, kLambExpAvg, kLambExpAvgSq, kLambStep, kLambNorms, kLambMaster,
                  kLambAbsmax };
enum LambFlag : int {
  kLambBiasCorrection = 1, kLambGradAveraging = 2, kLambTrustClip = 4, kLambAlwaysAdapt = 8,
  kLambDecoupled = 16, kLambClipGrads = 32,
  // A step split in two calls, so that sharded (FSDP2) norms can be all-reduced
  // in between (only when the step adapts): the first runs the moment pass
  // (m, v, norms column) and leaves the step counters alone, the second reads
  // the norms column, runs the apply pass and advances the counters.
  kLambMomentsOnly = 64, kLambApplyOnly = 128,
};

struct LambHyper {
  double lr, beta1, beta2, eps, weight_decay, max_grad_norm;
  int flags;
};

FO_HD bool lamb_adapts(const LambHyper& h) { return h.weight_decay != 0.0 || (h.flags & kLambAlwaysAdapt); }

// What the raw grad is divided by: the AMP scale times the clipping factor
// c = max(|g_all| / max_grad_norm, 1), where g_sq_total is of the scaled grads:
// the fp64 per-grad sums of squares added in the order of combine.h, so the CPU
// and CUDA get the same divisor from the same sums.
FO_HD double lamb_grad_divisor(const LambHyper& h, double g_sq_total, double grad_scale) {
  if (!(h.flags & kLambClipGrads)) return grad_scale;
  const double c = sqrt(g_sq_total) / grad_scale / h.max_grad_norm;
  return grad_scale * (c < 1.0 ? 1.0 : c);  // NaN stays NaN
}

// r = |p'| / |u|, 1 where either is 0, min(r, 1) with trust_clip.
FO_HD double lamb_trust_ratio(const LambHyper& h, double p_sq, double u_sq) {
  if (!lamb_adapts(h)) return 1.0;
  const double pn = sqrt(p_sq), un = sqrt(u_sq);
  double r = (pn > 0.0 && un > 0.0) ? pn / un : 1.0;
  if (h.flags & kLambTrustClip) r = r < 1.0 ? r : 1.0;
  return r;
}

template <class C> struct LambScalars {
  C beta1, beta3, beta2, one_minus_beta2, bc1, bc2_sqrt, eps, weight_decay;
  C decay_factor;  // 1 - lr * wd with decoupled decay, else exactly 1
  C coupled_wd;    // 0/1
  C grad_divisor, neg_lr, ratio;
};

// `step` is the already incremented count t.
template <class C>
FO_HD LambScalars<C> lamb_scalars(const LambHyper& h, double step, double lr, double grad_divisor, double ratio) {
  LambScalars<C> s;
  const bool bias = h.flags & kLambBiasCorrection;
  s.beta1 = static_cast<C>(h.beta1);
  s.beta3 = static_cast<C>((h.flags & kLambGradAveraging) ? 1.0 - h.beta1 : 1.0);
  s.beta2 = static_cast<C>(h.beta2);
  s.one_minus_beta2 = static_cast<C>(1.0 - h.beta2);
  s.bc1 = static_cast<C>(bias ? 1.0 - pow(h.beta1, step) : 1.0);
  s.bc2_sqrt = static_cast<C>(bias ? sqrt(1.0 - pow(h.beta2, step)) : 1.0);
  s.eps = static_cast<C>(h.eps);
  s.weight_decay = static_cast<C>(h.weight_decay);
  const bool decoupled = (h.flags & kLambDecoupled) && h.weight_decay != 0.0;
  s.decay_factor = static_cast<C>(decoupled ? 1.0 - lr * h.weight_decay : 1.0);
  s.coupled_wd = (!decoupled && h.weight_decay != 0.0) ? C(1) : C(0);
  s.grad_divisor = static_cast<C>(grad_divisor);
  s.neg_lr = static_cast<C>(-lr);
  s.ratio = static_cast<C>(ratio);
  return s;
}

// m = beta1 m + beta3 g, v = beta2 v + (1 - beta2) g^2 (g clipped and unscaled).
template <class C>
FO_HD void lamb_moments(C g, C& m, C& v, const LambScalars<C>& s) {
  g = g / s.grad_divisor;
  m = s.beta1 * m + s.beta3 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
}

// u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) (+ wd p unless decay is decoupled);
// p is the param before this step's decay.
template <class C>
FO_HD C lamb_direction(C p, C m, C v, const LambScalars<C>& s) {
  const C u = (m / s.bc1) / (fo_sqrt(v) / s.bc2_sqrt + s.eps);
  return s.coupled_wd != C(0) ? u + s.weight_decay * p : u;
}

FO_HD float lamb_decayed(float p, const LambScalars<float>& s) { return p * s.decay_factor; }
FO_HD double lamb_decayed(double p, const LambScalars<double>& s) { return p * s.decay_factor; }

// p = p (1 - lr wd) - lr (r u)
template <class C>
FO_HD C lamb_apply(C p, C u, const LambScalars<C>& s) {
  return lamb_decayed(p, s) + s.neg_lr * (u * s.ratio);
}

}  // namespace fusedopt
