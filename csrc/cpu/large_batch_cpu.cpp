// Compiled once per SIMD level with FUSEDOPT_SIMD_NS set by CMake. Per-tensor
// norms, LARS and LAMB on the CPU: each reducing pass goes through
// reduce_rows/lane_sums (reduce_cpu.h) so its sums are deterministic.
#include <cmath>
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

template <class P, class S, class C>
void lars_piece(const TensorRow& r, int64_t b, int64_t e, const LarsScalars<C> s) {
  P* __restrict__ p = col<P>(r, kLarsParam);
  const P* __restrict__ g = col<P>(r, kLarsGrad);
  S* __restrict__ buf = col<S>(r, kLarsMomentumBuffer);
  const C first = (r.flags & kRowFirstStep) ? C(1) : C(0);
  for (int64_t i = b; i < e; ++i) {
    C pv = load_as<P, C>(p[i]);
    C bv = buf ? load_as<S, C>(buf[i]) : C(0);
    lars_element<C>(pv, load_as<P, C>(g[i]), bv, first, s);
    store_as(p[i], pv);
    if (buf) store_as(buf[i], bv);
  }
}

// LAMB moment pass over [b, e): updates m, v; with `apply` (no trust ratio in
// this step) also moves p, else sums p'^2 and u^2 into out[2].
template <class P, class S, class C, bool kApply>
void lamb_moment_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s, double* out) {
  P* __restrict__ p = col<P>(r, kLambParam);
  const P* __restrict__ g = col<P>(r, kLambGrad);
  S* __restrict__ m = col<S>(r, kLambExpAvg);
  S* __restrict__ v = col<S>(r, kLambExpAvgSq);
  lane_sums<C, 2>(b, e, [&](int64_t i, C(&q)[2]) {
    const C pv = load_as<P, C>(p[i]);
    C mv = load_as<S, C>(m[i]), vv = load_as<S, C>(v[i]);
    lamb_moments<C>(load_as<P, C>(g[i]), mv, vv, s);
    // u from m, v as stored (bf16 state: rounded), as the apply pass sees them.
    mv = round_as<S, C>(mv);
    vv = round_as<S, C>(vv);
    store_as(m[i], mv);
    store_as(v[i], vv);
    const C u = lamb_direction<C>(pv, mv, vv, s);
    if constexpr (kApply) {
      store_as(p[i], lamb_apply<C>(pv, u, s));
      q[0] = C(0);
      q[1] = C(0);
    } else {
      const C pd = lamb_decayed(pv, s);
      q[0] = pd * pd;
      q[1] = u * u;
    }
  }, out);
}

template <class P, class S, class C>
void lamb_apply_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s) {
  P* __restrict__ p = col<P>(r, kLambParam);
  const S* __restrict__ m = col<S>(r, kLambExpAvg);
  const S* __restrict__ v = col<S>(r, kLambExpAvgSq);
  for (int64_t i = b; i < e; ++i) {
    const C pv = load_as<P, C>(p[i]);
    const C u = lamb_direction<C>(pv, load_as<S, C>(m[i]), load_as<S, C>(v[i]), s);
    store_as(p[i], lamb_apply<C>(pv, u, s));
  }
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
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    std::vector<LarsScalars<C>> scalars(static_cast<size_t>(call.n_rows), lars_scalars<C>(h, lr, divisor, 1.0));
    if (lars_adapts(h)) {
      // Pass 1: |p|^2 and |g|^2 of every tensor.
      const std::vector<double> sums = reduce_rows<2>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
        const P* __restrict__ p = col<const P>(call.rows[r], kLarsParam);
        const P* __restrict__ g = col<const P>(call.rows[r], kLarsGrad);
        lane_sums<C, 2>(b, e, [&](int64_t i, C(&q)[2]) {
          const C pv = load_as<P, C>(p[i]), gv = load_as<P, C>(g[i]);
          q[0] = pv * pv;
          q[1] = gv * gv;
        }, out);
      });
      for (int64_t r = 0; r < call.n_rows; ++r) {
        float n[2];
        store_sums<2>(call.rows[r], kLarsNorms, &sums[2 * r], n);
        scalars[r] = lars_scalars<C>(h, lr, divisor, lars_trust_ratio(h, lr, n[0], n[1], divisor));
      }
    }
    // Pass 2: the update.
    for_each_piece(row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                   [&](int64_t, int64_t r, int64_t b, int64_t e) { lars_piece<P, S, C>(call.rows[r], b, e, scalars[r]); });
  });
}

void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const float* grad_sq, int64_t n_grad_sq) {
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
      float* step = col<float>(call.rows[r], kLambStep);
      *step += 1.0f;
      scalars[r] = lamb_scalars<C>(h, *step, lr, divisor, 1.0);
    }
    const std::vector<int64_t> off = row_offsets(call.rows, call.n_rows);
    if (!lamb_adapts(h)) {  // r = 1: moments and update in one pass
      for_each_piece(off, kCpuChunkElements, [&](int64_t, int64_t r, int64_t b, int64_t e) {
        double unused[2];
        lamb_moment_piece<P, S, C, true>(call.rows[r], b, e, scalars[r], unused);
      });
      return;
    }
    const std::vector<double> sums = reduce_rows<2>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
      lamb_moment_piece<P, S, C, false>(call.rows[r], b, e, scalars[r], out);
    });
    for (int64_t r = 0; r < call.n_rows; ++r) {
      float n[2];
      store_sums<2>(call.rows[r], kLambNorms, &sums[2 * r], n);
      scalars[r].ratio = static_cast<C>(lamb_trust_ratio(h, n[0], n[1]));
    }
    for_each_piece(off, kCpuChunkElements, [&](int64_t, int64_t r, int64_t b, int64_t e) {
      lamb_apply_piece<P, S, C>(call.rows[r], b, e, scalars[r]);
    });
  });
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
