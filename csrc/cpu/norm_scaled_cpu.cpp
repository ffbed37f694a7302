// Compiled once per SIMD level with FUSEDOPT_SIMD_NS set by CMake. Per-tensor
// norms, LARS and LAMB on the CPU: each reducing pass goes through
// reduce_rows/lane_sums (reduce_cpu.h) so its sums are deterministic.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "../ops/combine.h"
#include "../ops/dispatch.h"
#include "norm_scaled_cpu.h"
#include "optim_cpu.h"
#include "optim_loops.h"
#include "quant8_loops.h"
#include "reduce_cpu.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

// A row's two norm sums: this call's `computed` ones, also stored in the
// row's norms slot (double[2]) for a later call or an all-reduce, or (null
// `computed`) the ones an earlier call left in the slot.
void row_sums(const TensorRow& row, int column, const double* computed, double (&n)[2]) {
  double* slot = col<double>(row, column);
  for (int k = 0; k < 2; ++k) {
    n[k] = computed ? computed[k] : slot[k];
    if (computed && slot) slot[k] = n[k];
  }
}

template <class P, class C, int kStore>
void lars_norms_piece(const TensorRow& r, int64_t b, int64_t e, double* out) {
  const ParamIO<P, C, kStore> p(r, kLarsParam, kLarsMaster);
  const P* __restrict__ g = col<const P>(r, kLarsGrad);
  lane_sums<C, 2>(b, e, [&](int64_t i, C(&q)[2]) {
    const C pv = p.load(i), gv = load_as<P, C>(g[i]);
    q[0] = pv * pv;
    q[1] = gv * gv;
  }, out);
}

// LAMB moment pass over [b, e): updates m, v; with `apply` (no trust ratio in
// this step) also moves p, else sums p'^2 and u^2 into out[2].
template <class P, class S, class C, bool kApply, int kStore>
void lamb_moment_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s, double* out,
                       StochasticRounding sr) {
  const ParamIO<P, C, kStore> p(r, kLambParam, kLambMaster, sr);
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

template <class P, class S, class C, int kStore>
void lamb_apply_piece(const TensorRow& r, int64_t b, int64_t e, const LambScalars<C> s, StochasticRounding sr) {
  const ParamIO<P, C, kStore> p(r, kLambParam, kLambMaster, sr);
  const S* __restrict__ m = col<S>(r, kLambExpAvg);
  const S* __restrict__ v = col<S>(r, kLambExpAvgSq);
  for (int64_t i = b; i < e; ++i) {
    const C pv = p.load(i);
    const C u = lamb_direction<C>(pv, load_as<S, C>(m[i]), load_as<S, C>(v[i]), s);
    p.store(i, lamb_apply<C>(pv, u, s));
  }
}

// LAMB's moment pass over the whole blocks [bb, be) of a row with 8-bit m, v:
// each block decoded, moved by lamb_moments, encoded with its new scales and
// decoded again, so that u comes from m, v as stored (as the apply pass sees
// them); then as lamb_moment_piece: p moves (kApply) or p'^2, u^2 are summed,
// block after block in order (lane_sums inside a block).
template <class P, bool kApply, int kStore>
void lamb_q8_moment_piece(const TensorRow& r, int64_t bb, int64_t be, const LambScalars<float> s, double* out,
                          StochasticRounding sr) {
  const ParamIO<P, float, kStore> p(r, kLambParam, kLambMaster, sr);
  const P* __restrict__ g = col<P>(r, kLambGrad);
  const QuantState<Code8::kSigned> m(r, kLambExpAvg, kLambAbsmax, 0);
  const QuantState<Code8::kUnsigned> v(r, kLambExpAvgSq, kLambAbsmax, 1);
  alignas(64) float mb[kQuantBlock], vb[kQuantBlock];
  double acc[2] = {0.0, 0.0};
  for_each_block(r.numel, bb, be, [&](int64_t blk, int64_t b, int64_t n) {
    m.decode(blk, b, n, mb);
    v.decode(blk, b, n, vb);
    for (int64_t i = 0; i < n; ++i) lamb_moments<float>(load_as<P, float>(g[b + i]), mb[i], vb[i], s);
    clear_tail(mb, n);
    clear_tail(vb, n);
    m.encode(blk, b, n, mb);
    v.encode(blk, b, n, vb);
    m.decode(blk, b, n, mb);
    v.decode(blk, b, n, vb);
    if constexpr (kApply) {
      for (int64_t i = 0; i < n; ++i) {
        const float pv = p.load(b + i);
        p.store(b + i, lamb_apply<float>(pv, lamb_direction<float>(pv, mb[i], vb[i], s), s));
      }
    } else {
      double q[2];
      lane_sums<float, 2>(0, n, [&](int64_t i, float(&e)[2]) {
        const float pv = p.load(b + i), pd = lamb_decayed(pv, s), u = lamb_direction<float>(pv, mb[i], vb[i], s);
        e[0] = pd * pd;
        e[1] = u * u;
      }, q);
      acc[0] += q[0];
      acc[1] += q[1];
    }
  });
  out[0] = acc[0];
  out[1] = acc[1];
}

// LAMB's apply pass over the blocks [bb, be) of a row with 8-bit m, v.
template <class P, int kStore>
void lamb_q8_apply_piece(const TensorRow& r, int64_t bb, int64_t be, const LambScalars<float> s,
                         StochasticRounding sr) {
  const ParamIO<P, float, kStore> p(r, kLambParam, kLambMaster, sr);
  const QuantState<Code8::kSigned> m(r, kLambExpAvg, kLambAbsmax, 0);
  const QuantState<Code8::kUnsigned> v(r, kLambExpAvgSq, kLambAbsmax, 1);
  alignas(64) float mb[kQuantBlock], vb[kQuantBlock];
  for_each_block(r.numel, bb, be, [&](int64_t blk, int64_t b, int64_t n) {
    m.decode(blk, b, n, mb);
    v.decode(blk, b, n, vb);
    for (int64_t i = 0; i < n; ++i) {
      const float pv = p.load(b + i);
      p.store(b + i, lamb_apply<float>(pv, lamb_direction<float>(pv, mb[i], vb[i], s), s));
    }
  });
}

}  // namespace

void multi_tensor_norms(const NormsCall& call) {
  check_norms_out_dtype(call.out_dtype);
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
      void* out = col<void>(call.rows[r], kNormsOut);
      if (out) store_norm(out, call.out_dtype, 0, call.take_sqrt ? std::sqrt(sums[r]) : sums[r]);
    }
  });
}

void multi_tensor_lars(const OptimCall& call, const LarsHyper& h) {
  if (step_is_skipped(call)) return;
  const bool norms_only = h.flags & kLarsNormsOnly, norms_given = h.flags & kLarsNormsGiven;
  const double lr = effective_lr(call, h.lr), divisor = grad_divisor(call);
  // 8-bit buffers (momentum != 0): pass 2 walks whole blocks; without momentum there is no buffer.
  const bool q8 = call.state_dtype == kInt8 && h.momentum != 0.0;
  if (q8) check_q8_param(call.param_dtype);
  dispatch_param_state(call.param_dtype, call.state_dtype == kInt8 ? kFloat32 : call.state_dtype,
                       [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    with_param_store<P>(call, kLarsMaster, [&](auto store) {
      constexpr int M = decltype(store)::value;
      std::vector<LarsScalars<C>> scalars(static_cast<size_t>(call.n_rows), lars_scalars<C>(h, lr, divisor, 1.0));
      if (lars_adapts(h)) {
        std::vector<double> sums;
        if (!norms_given) {  // pass 1: |p|^2 and |g|^2 of every tensor
          sums = reduce_rows<2>(call.rows, call.n_rows, [&](int64_t r, int64_t b, int64_t e, double* out) {
            lars_norms_piece<P, C, M>(call.rows[r], b, e, out);
          });
        }
        for (int64_t r = 0; r < call.n_rows; ++r) {
          double n[2];
          row_sums(call.rows[r], kLarsNorms, norms_given ? nullptr : &sums[2 * r], n);
          scalars[r] = lars_scalars<C>(h, lr, divisor, lars_trust_ratio(h, lr, n[0], n[1], divisor));
        }
      }
      if (norms_only) return;
      // Pass 2: the update.
      const auto element = [](C& p, C g, C& buf, C first, const LarsScalars<C>& sc) {
        lars_element<C>(p, g, buf, first, sc);
      };
      if constexpr (std::is_same_v<C, float>) {
        if (q8) {
          for_each_piece(call.rows, row_block_offsets(call), kChunkBlocks, [&](int64_t, int64_t r, int64_t bb, int64_t be) {
            momentum_q8_piece<P, M>(call.rows[r], kLarsColumns, kLarsAbsmax, bb, be, scalars[r], element,
                                    call.rounding);
          });
          return;
        }
      }
      for_each_piece(call.rows, row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) {
        momentum_piece<P, S, C, M>(call.rows[r], kLarsColumns, b, e, scalars[r], element, call.rounding);
      });
    });
  });
  if (!norms_only) advance_buffer_ages(call, kLarsBufferAge);
}

void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const double* grad_sq, int64_t n_grad_sq) {
  const bool moments_only = h.flags & kLambMomentsOnly, apply_only = h.flags & kLambApplyOnly;
  if ((moments_only || apply_only) && !lamb_adapts(h))
    throw std::invalid_argument("fusedopt: a split LAMB step needs a step that adapts (no norms otherwise)");
  if (step_is_skipped(call)) return;
  const double lr = effective_lr(call, h.lr);
  double divisor = grad_divisor(call);
  // The CUDA driver adds the sums in the same order (combine.h): same divisor bits.
  if (h.flags & kLambClipGrads) divisor = lamb_grad_divisor(h, fixed_order_sum(grad_sq, n_grad_sq), divisor);
  // 8-bit m, v: the passes walk whole blocks (chunks of kChunkBlocks blocks).
  const bool q8 = call.state_dtype == kInt8;
  if (q8) check_q8_param(call.param_dtype);
  dispatch_param_state(call.param_dtype, q8 ? kFloat32 : call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using C = typename ComputeOf<P>::type;
    // Both calls of a split step use t + 1; only the second advances the counters.
    std::vector<LambScalars<C>> scalars = step_scalars<LambScalars<C>>(
        call, kLambStep, !moments_only, [&](double t) { return lamb_scalars<C>(h, t, lr, divisor, 1.0); });
    const std::vector<int64_t> off = q8 ? row_block_offsets(call) : row_offsets(call.rows, call.n_rows);
    const int64_t chunk = q8 ? kChunkBlocks : kCpuChunkElements;
    with_param_store<P>(call, kLambMaster, [&](auto store) {
      constexpr int M = decltype(store)::value;
      // A piece: elements [b, e) of a row, or its blocks [b, e) with 8-bit state.
      const auto moments = [&](auto apply, int64_t r, int64_t b, int64_t e, double* out) {
        constexpr bool A = decltype(apply)::value;
        if constexpr (std::is_same_v<C, float>) {
          if (q8) return lamb_q8_moment_piece<P, A, M>(call.rows[r], b, e, scalars[r], out, call.rounding);
        }
        lamb_moment_piece<P, S, C, A, M>(call.rows[r], b, e, scalars[r], out, call.rounding);
      };
      if (!lamb_adapts(h)) {  // r = 1: moments and update in one pass
        for_each_piece(call.rows, off, chunk, [&](int64_t, int64_t r, int64_t b, int64_t e) {
          double unused[2];
          moments(std::true_type{}, r, b, e, unused);
        });
        return;
      }
      std::vector<double> sums;
      if (!apply_only) {
        sums = reduce_rows_over<2>(call.rows, call.n_rows, off, chunk, [&](int64_t r, int64_t b, int64_t e,
                                                                            double* out) {
          moments(std::false_type{}, r, b, e, out);
        });
      }
      for (int64_t r = 0; r < call.n_rows; ++r) {
        double n[2];
        row_sums(call.rows[r], kLambNorms, apply_only ? nullptr : &sums[2 * r], n);
        scalars[r].ratio = static_cast<C>(lamb_trust_ratio(h, n[0], n[1]));
      }
      if (moments_only) return;
      for_each_piece(call.rows, off, chunk, [&](int64_t, int64_t r, int64_t b, int64_t e) {
        if constexpr (std::is_same_v<C, float>) {
          if (q8) return lamb_q8_apply_piece<P, M>(call.rows[r], b, e, scalars[r], call.rounding);
        }
        lamb_apply_piece<P, S, C, M>(call.rows[r], b, e, scalars[r], call.rounding);
      });
    });
  });
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
