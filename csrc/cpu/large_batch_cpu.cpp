// Compiled once per SIMD level with FUSEDOPT_SIMD_NS set by CMake. Per-tensor
// norms, LARS and LAMB on the CPU: each reducing pass goes through
// reduce_rows/lane_sums (reduce_cpu.h) so its sums are deterministic.
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../ops/dispatch.h"
#include "large_batch_cpu.h"
#include "optim_cpu.h"
#include "reduce_cpu.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

// Stores a row's K sums as floats at its norms pointer (when it has one) and
// returns them rounded the same way, so CPU and CUDA derive ratios from fp32 norms.
template <int K>
void store_sums(const TensorRow& row, int column, const double* sums, float (&out)[K], bool take_sqrt = false) {
  float* dst = col<float>(row, column);
  for (int k = 0; k < K; ++k) {
    out[k] = static_cast<float>(take_sqrt ? std::sqrt(sums[k]) : sums[k]);
    if (dst) dst[k] = out[k];
  }
}

template <class P, class C, bool kMaster>
void lars_norms_piece(const TensorRow& r, int64_t b, int64_t e, double* out) {
  const ParamIO<P, C, kMaster> p(r, kLarsParam, kLarsMaster);
  const P* __restrict__ g = col<const P>(r, kLarsGrad);
  lane_sums<C, 2>(b, e, [&](int64_t i, C(&q)[2]) {
    const C pv = p.load(i), gv = load_as<P, C>(g[i]);
    q[0] = pv * pv;
    q[1] = gv * gv;
  }, out);
}

template <class P, class S, class C, bool kMaster>
void lars_piece(const TensorRow& r, int64_t b, int64_t e, const LarsScalars<C> s) {
  const ParamIO<P, C, kMaster> p(r, kLarsParam, kLarsMaster);
  const P* __restrict__ g = col<P>(r, kLarsGrad);
  S* __restrict__ buf = col<S>(r, kLarsMomentumBuffer);
  const C first = (r.flags & kRowFirstStep) ? C(1) : C(0);
  for (int64_t i = b; i < e; ++i) {
    C pv = p.load(i);
    C bv = buf ? load_as<S, C>(buf[i]) : C(0);
    lars_element<C>(pv, load_as<P, C>(g[i]), bv, first, s);
    p.store(i, pv);
    if (buf) store_as(buf[i], bv);
  }
}

// LAMB moment pass over [b, e): updates m, v; with `apply` (no trust ratio in
// this step) also moves p, else sums p'^2 and u^2 into out[2].
template <class P, class S, class C, bool kApply, bool kMaster>
void lamb_moment_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s, double* out) {
  const ParamIO<P, C, kMaster> p(r, kLambParam, kLambMaster);
  const P* __restrict__ g = col<P>(r, kLambGrad);
  S* __restrict__ m = col<S>(r, kLambExpAvg);
  S* __restrict__ v = col<S>(r, kLambExpAvgSq);
  lane_sums<C, 2>(b, e, [&](int64_t i, C(&q)[2]) {
    const C pv = p.load(i);
    C mv = load_as<S, C>(m[i]), vv = load_as<S, C>(v[i]);
    lamb_moments<C>(load_as<P, C>(g[i]), mv, vv, s);
    // u from m, v as stored (bf16 state: rounded), as the apply pass sees them.
    mv = round_as<S, C>(mv);
    vv = round_as<S, C>(vv);
    store_as(m[i], mv);
    store_as(v[i], vv);
    const C u = lamb_direction<C>(pv, mv, vv, s);
    if constexpr (kApply) {
      p.store(i, lamb_apply<C>(pv, u, s));
      q[0] = C(0);
      q[1] = C(0);
    } else {
      const C pd = lamb_decayed(pv, s);
      q[0] = pd * pd;
      q[1] = u * u;
    }
  }, out);
}

template <class P, class S, class C, bool kMaster>
void lamb_apply_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s) {
  const ParamIO<P, C, kMaster> p(r, kLambParam, kLambMaster);
  const S* __restrict__ m = col<S>(r, kLambExpAvg);
  const S* __restrict__ v = col<S>(r, kLambExpAvgSq);
  for (int64_t i = b; i < e; ++i) {
    const C pv = p.load(i);
    const C u = lamb_direction<C>(pv, load_as<S, C>(m[i]), load_as<S, C>(v[i]), s);
    p.store(i, lamb_apply<C>(pv, u, s));
  }
}

// Calls fn(std::integral_constant<bool, master>) once: the master column as a
// compile-time switch, so the element loops stay branch-free.
template <class Fn>
void with_master(bool master, Fn&& fn) {
  master ? fn(std::true_type{}) : fn(std::false_type{});
}

// A row's two norm sums as left in its norms column by an earlier call.
void given_sums(const TensorRow& row, int column, float (&n)[2]) {
  const float* src = col<const float>(row, column);
  n[0] = src[0];
  n[1] = src[1];
}

}  // namespace

void multi_tensor_norms(const NormsCall& call) {
  dispatch_float_dtype(call.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename ComputeOf<T>::type;
    const std::vector<double> sums = reduce_rows<1>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
      const T* __restrict__ x = col<const T>(call.rows[r], kNormsInput);
      lane_sums<C, 1>(b, e, [&](int64_t i, C(&q)[1]) {
        const C xv = load_as<T, C>(x[i]);
        q[0] = xv * xv;
      }, out);
    });
    for (int64_t r = 0; r < call.n_rows; ++r) {
      float unused[1];
      store_sums<1>(call.rows[r], kNormsOut, &sums[r], unused, call.take_sqrt);
    }
  });
}

void multi_tensor_lars(const OptimCall& call, const LarsHyper& h) {
  if (step_is_skipped(call)) return;
  const bool norms_only = h.flags & kLarsNormsOnly, norms_given = h.flags & kLarsNormsGiven;
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    with_master(any_master(call, kLarsMaster), [&](auto master) {
      constexpr bool M = decltype(master)::value;
      std::vector<LarsScalars<C>> scalars(static_cast<size_t>(call.n_rows), lars_scalars<C>(h, lr, divisor, 1.0));
      if (lars_adapts(h)) {
        std::vector<double> sums;
        if (!norms_given) {  // pass 1: |p|^2 and |g|^2 of every tensor
          sums = reduce_rows<2>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
            lars_norms_piece<P, C, M>(call.rows[r], b, e, out);
          });
        }
        for (int64_t r = 0; r < call.n_rows; ++r) {
          float n[2];
          if (norms_given) given_sums(call.rows[r], kLarsNorms, n);
          else store_sums<2>(call.rows[r], kLarsNorms, &sums[2 * r], n);
          scalars[r] = lars_scalars<C>(h, lr, divisor, lars_trust_ratio(h, lr, n[0], n[1], divisor));
        }
      }
      if (norms_only) return;
      // Pass 2: the update.
      for_each_piece(row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) { lars_piece<P, S, C, M>(call.rows[r], b, e, scalars[r]); });
    });
  });
}

void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const float* grad_sq, int64_t n_grad_sq) {
  const bool moments_only = h.flags & kLambMomentsOnly, apply_only = h.flags & kLambApplyOnly;
  if ((moments_only || apply_only) && !lamb_adapts(h))
    throw std::invalid_argument("fusedopt: a split LAMB step needs a step that adapts (no norms otherwise)");
  if (step_is_skipped(call)) return;
  const double lr = effective_lr(call, h.lr);
  double divisor = grad_divisor(call);
  if (h.flags & kLambClipGrads) {
    double total = 0.0;
    for (int64_t i = 0; i < n_grad_sq; ++i) total += grad_sq[i];
    divisor = lamb_grad_divisor(h, total, divisor);
  }
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    std::vector<LambScalars<C>> scalars(static_cast<size_t>(call.n_rows));
    for (int64_t r = 0; r < call.n_rows; ++r) {
      // Both calls of a split step use t + 1; only the second advances the counter.
      float* step = col<float>(call.rows[r], kLambStep);
      const float t = *step + 1.0f;
      if (!moments_only) *step = t;
      scalars[r] = lamb_scalars<C>(h, t, lr, divisor, 1.0);
    }
    const std::vector<int64_t> off = row_offsets(call.rows, call.n_rows);
    with_master(any_master(call, kLambMaster), [&](auto master) {
      constexpr bool M = decltype(master)::value;
      if (!lamb_adapts(h)) {  // r = 1: moments and update in one pass
        for_each_piece(off, kCpuChunkElements, [&](int64_t, int64_t r, int64_t b, int64_t e) {
          double unused[2];
          lamb_moment_piece<P, S, C, true, M>(call.rows[r], b, e, scalars[r], unused);
        });
        return;
      }
      std::vector<double> sums;
      if (!apply_only) {
        sums = reduce_rows<2>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
          lamb_moment_piece<P, S, C, false, M>(call.rows[r], b, e, scalars[r], out);
        });
      }
      for (int64_t r = 0; r < call.n_rows; ++r) {
        float n[2];
        if (apply_only) given_sums(call.rows[r], kLambNorms, n);
        else store_sums<2>(call.rows[r], kLambNorms, &sums[2 * r], n);
        scalars[r].ratio = static_cast<C>(lamb_trust_ratio(h, n[0], n[1]));
      }
      if (moments_only) return;
      for_each_piece(off, kCpuChunkElements, [&](int64_t, int64_t r, int64_t b, int64_t e) {
        lamb_apply_piece<P, S, C, M>(call.rows[r], b, e, scalars[r]);
      });
    });
  });
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
