// Muon per-element math (torch.optim.Muon semantics), shared by the CPU and
// CUDA drivers. A Muon step is three passes (python/fusedopt/functional/muon.py):
//   1. momentum (this file, muon_momentum_element): the buffer and the update
//      direction, written to the Newton-Schulz workspace;
//   2. Newton-Schulz, batched over matrices of one shape (torch.baddbmm);
//   3. apply (muon_apply_element): decay and the final add of the orthogonal update.
#pragma once
#include "adam.h"  // lerp: torch's two-branch lerp, also Adam's first moment
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

// `update`: the workspace slot of this param (the Newton-Schulz input, then its
// output; its dtype is the call's update dtype). `lr_ratio`: one double per row,
// the adjust_lr factor of the param's matrix shape (read by the apply pass only).
enum MuonColumn { kMuonParam = 0, kMuonGrad, kMuonMomentumBuffer, kMuonUpdate, kMuonMaster, kMuonLrRatio };

enum MuonFlag : int {
  kMuonNesterov = 1,
  // The update is stored in fp32 rounded to bf16 values: the CPU path of
  // ns_dtype=bfloat16 (bf16 values, fp32 matmuls, outputs rounded to bf16).
  kMuonUpdateBf16Values = 2,
};

struct MuonHyper {
  double lr, momentum, weight_decay;
  int flags;
};

template <class C> struct MuonMomentumScalars {
  C buffer_weight;  // 1 - momentum: buf.lerp_(g, 1 - momentum)
  C momentum;       // nesterov: g.lerp(buf, momentum)
  C grad_divisor;   // AMP scale, or 1
  C nesterov, bf16_values;  // 0/1: selects vectorize
};

template <class C>
FO_HD MuonMomentumScalars<C> muon_momentum_scalars(const MuonHyper& h, double grad_scale) {
  MuonMomentumScalars<C> s;
  // torch computes 1 - momentum in Python (double) and lerp casts it to the compute type.
  s.buffer_weight = static_cast<C>(1.0 - h.momentum);
  s.momentum = static_cast<C>(h.momentum);
  s.grad_divisor = static_cast<C>(grad_scale);
  s.nesterov = (h.flags & kMuonNesterov) ? C(1) : C(0);
  s.bf16_values = (h.flags & kMuonUpdateBf16Values) ? C(1) : C(0);
  return s;
}

// buf <- lerp(buf, g, 1 - mu); returns the update direction: lerp(g, buf, mu)
// with nesterov, else buf. A zero buffer (torch creates it as zeros) makes the
// first step's buffer (1 - mu) g, as in torch.
template <class C>
FO_HD C muon_momentum_element(C g, C& buf, const MuonMomentumScalars<C>& s) {
  g = g / s.grad_divisor;
  buf = lerp(buf, g, s.buffer_weight);
  C u = s.nesterov != C(0) ? lerp(g, buf, s.momentum) : buf;
  // torch's Newton-Schulz starts from grad.bfloat16(): round once, here.
  return s.bf16_values != C(0) ? round_as<BFloat16, C>(u) : u;
}

template <class C> struct MuonApplyScalars {
  C decay;   // 1 - lr * weight_decay (exactly 1 without decay)
  C neg_lr;  // -lr * adjust_lr ratio of the row's matrix shape
};

template <class C>
FO_HD MuonApplyScalars<C> muon_apply_scalars(const MuonHyper& h, double lr, double ratio) {
  MuonApplyScalars<C> s;
  s.decay = static_cast<C>(h.weight_decay != 0.0 ? 1.0 - lr * h.weight_decay : 1.0);
  s.neg_lr = static_cast<C>(-(lr * ratio));
  return s;
}

// torch: param.mul_(1 - lr * wd); param.add_(update, alpha=-adjusted_lr).
template <class C>
FO_HD void muon_apply_element(C& p, C u, const MuonApplyScalars<C>& s) {
  p = p * s.decay;
  p = p + s.neg_lr * u;
}

}  // namespace fusedopt

#include <stdexcept>
#include <string>
#include "dispatch.h"

namespace fusedopt {

// fn(Tag<U>) for the update dtype of a Muon call: the Newton-Schulz workspace
// holds fp32, bf16 or fp64 values (fp16 is not a Newton-Schulz dtype).
template <class Fn>
decltype(auto) dispatch_muon_update_dtype(int code, Fn&& fn) {
  switch (code) {
    case kFloat32: return fn(Tag<float>{});
    case kBFloat16: return fn(Tag<BFloat16>{});
    case kFloat64: return fn(Tag<double>{});
  }
  throw std::invalid_argument("fusedopt: Muon update dtype must be float32, bfloat16 or float64; got code " +
                              std::to_string(code));
}

}  // namespace fusedopt
