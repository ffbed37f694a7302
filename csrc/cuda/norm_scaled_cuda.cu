// CUDA drivers of the per-tensor norms, LARS and LAMB: functors over the shared
// math (ops/norms.h, ops/lars.h, ops/lamb.h) run by the multi-tensor kernels.
// Trust ratios are computed per block from norms left on the device by the
// previous pass, so a step never waits for the host.
#include <stdexcept>

#include "../ops/dispatch.h"
#include "cuda_api.h"
#include "momentum.cuh"
#include "quant8.cuh"
#include "reduce.cuh"

namespace fusedopt::cuda {
namespace {

template <class T>
struct NormsFunctor {
  using Acc = typename ComputeOf<T>::type;
  static constexpr int kVec = 16 / sizeof(T);
  __device__ bool skip() const { return false; }
  __device__ int prepare(const TensorRow&) const { return 0; }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, int, Acc (&acc)[1]) const {
    Acc x[V];
    load_elems<V>(col<T>(r, kNormsInput), i, x);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[0] += x[k] * x[k];
  }
};

// LARS pass 1: |p|^2 and |g|^2.
template <class P>
struct LarsNormsFunctor {
  using Acc = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  DeviceScalars d;
  __device__ bool skip() const { return d.skip(); }
  __device__ int prepare(const TensorRow&) const { return 0; }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, int, Acc (&acc)[2]) const {
    Acc p[V], g[V];
    load_param<V, P>(r, kLarsParam, kLarsMaster, i, p);
    load_elems<V>(col<P>(r, kLarsGrad), i, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc[0] += p[k] * p[k];
      acc[1] += g[k] * g[k];
    }
  }
};

// LARS pass 2: the update (the momentum loop SGD shares), with the trust ratio
// from the row's fp64 norms.
struct LarsRule {
  static constexpr MomentumColumns kColumns = kLarsColumns;
  static constexpr int kAbsmaxColumn = kLarsAbsmax;
  LarsHyper h;
  template <class C>
  __device__ LarsScalars<C> scalars(const TensorRow& r, const DeviceScalars& d) const {
    const double lr = d.lr(h.lr), divisor = d.divisor();
    double ratio = 1.0;
    if (lars_adapts(h)) {
      const double* n = col<double>(r, kLarsNorms);
      ratio = lars_trust_ratio(h, lr, n[0], n[1], divisor);
    }
    return lars_scalars<C>(h, lr, divisor, ratio);
  }
  template <class C>
  __device__ static void element(C& p, C g, C& buf, C first, const LarsScalars<C>& s) {
    lars_element<C>(p, g, buf, first, s);
  }
};

// What LAMB's passes share: the per-tensor scalars of this step.
struct LambBase {
  LambHyper h;
  DeviceScalars d;
  const double* clip_divisor;  // written by LambClipCombine; null: no clipping
  __device__ bool skip() const { return d.skip(); }
  template <class C>
  __device__ LambScalars<C> scalars(const TensorRow& r, double ratio) const {
    const double divisor = clip_divisor ? *clip_divisor : d.divisor();
    return lamb_scalars<C>(h, next_step(r, kLambStep), d.lr(h.lr), divisor, ratio);
  }
};

// LAMB pass 2: m, v; with kApply (no trust ratio) also p, else sums of p'^2, u^2.
template <class P, class S, bool kApply>
struct LambMomentFunctor : LambBase {
  using C = typename ComputeOf<P>::type;
  using Acc = C;
  static constexpr int kVec = 16 / sizeof(P);
  static constexpr bool kPrepareOnce = true;  // lamb_scalars: two pow() per row
  __device__ LambScalars<C> prepare(const TensorRow& r) const { return scalars<C>(r, 1.0); }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const LambScalars<C>& s, Acc (&acc)[2]) const {
    C p[V], g[V], m[V], v[V];
    load_param<V, P>(r, kLambParam, kLambMaster, i, p);
    load_elems<V>(col<P>(r, kLambGrad), i, g);
    load_elems<V>(col<S>(r, kLambExpAvg), i, m);
    load_elems<V>(col<S>(r, kLambExpAvgSq), i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      lamb_moments<C>(g[k], m[k], v[k], s);
      m[k] = round_as<S, C>(m[k]);  // u from m, v as stored, as the apply pass sees them
      v[k] = round_as<S, C>(v[k]);
      const C u = lamb_direction<C>(p[k], m[k], v[k], s);
      if constexpr (kApply) {
        p[k] = lamb_apply<C>(p[k], u, s);
      } else {
        const C pd = lamb_decayed(p[k], s);
        acc[0] += pd * pd;
        acc[1] += u * u;
      }
    }
    store_elems<V>(col<S>(r, kLambExpAvg), i, m);
    store_elems<V>(col<S>(r, kLambExpAvgSq), i, v);
    if constexpr (kApply) store_param<V, P>(r, kLambParam, kLambMaster, i, p, d.rounding);
  }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const LambScalars<C>& s) const {
    Acc unused[2] = {C(0), C(0)};
    apply<V>(r, i, s, unused);
  }
};

// LAMB pass 3: u recomputed from the new m, v; p moves by -lr r u.
template <class P, class S>
struct LambApplyFunctor : LambBase {
  using C = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  static constexpr bool kPrepareOnce = true;
  __device__ LambScalars<C> prepare(const TensorRow& r) const {
    const double* n = col<double>(r, kLambNorms);
    return scalars<C>(r, lamb_trust_ratio(h, n[0], n[1]));
  }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const LambScalars<C>& s) const {
    C p[V], m[V], v[V];
    load_param<V, P>(r, kLambParam, kLambMaster, i, p);
    load_elems<V>(col<S>(r, kLambExpAvg), i, m);
    load_elems<V>(col<S>(r, kLambExpAvgSq), i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = lamb_apply<C>(p[k], lamb_direction<C>(p[k], m[k], v[k], s), s);
    store_param<V, P>(r, kLambParam, kLambMaster, i, p, d.rounding);
  }
};

// fn(m, v, q, base, lane, mv, vv) for each quantization block of LAMB's chunk,
// a warp per block, with this lane's m, v decoded into mv, vv (quant8.cuh).
template <class Fn>
__device__ __forceinline__ void for_each_lamb_q8_block(const TensorRow& row, int32_t chunk, Fn&& fn) {
  const WarpQuantState<Code8::kSigned> m(row, kLambExpAvg, kLambAbsmax, 0);
  const WarpQuantState<Code8::kUnsigned> v(row, kLambExpAvgSq, kLambAbsmax, 1);
  for_each_warp_block(row, chunk, [&](int64_t q, int64_t base, int lane) {
    float mv[kPerLane], vv[kPerLane];
    m.load(q, base, lane, row.numel, mv);
    v.load(q, base, lane, row.numel, vv);
    fn(m, v, q, base, lane, mv, vv);
  });
}

// LAMB pass 2 with 8-bit m, v (quant8.cuh): a warp per block decodes m, v, moves
// them (lamb_moments), encodes them with their new scales and goes on with the
// values as stored; then as LambMomentFunctor.
template <class P, bool kApply>
struct LambQ8MomentFunctor : LambBase {
  using Acc = float;
  static constexpr bool kPrepareOnce = true;
  static constexpr bool kVisitsChunks = true;
  __device__ LambScalars<float> prepare(const TensorRow& r) const { return scalars<float>(r, 1.0); }
  __device__ void visit_chunk(const TensorRow& row, int32_t chunk, const LambScalars<float>& s, Acc (&acc)[2]) const {
    const int64_t n = row.numel;
    for_each_lamb_q8_block(row, chunk, [&](const auto& m, const auto& v, int64_t q, int64_t base, int lane,
                                           float (&mv)[kPerLane], float (&vv)[kPerLane]) {
      for_each_lane_element(base, lane, n, [&](int k, int64_t i) {
        float g[1];
        load_elems<1>(col<P>(row, kLambGrad), i, g);
        lamb_moments<float>(g[0], mv[k], vv[k], s);
      });
      m.template store<true>(q, base, lane, n, mv);
      v.template store<true>(q, base, lane, n, vv);
      for_each_lane_element(base, lane, n, [&](int k, int64_t i) {
        float p[1];
        load_param<1, P>(row, kLambParam, kLambMaster, i, p);
        const float u = lamb_direction<float>(p[0], mv[k], vv[k], s);
        if constexpr (kApply) {
          p[0] = lamb_apply<float>(p[0], u, s);
          store_param<1, P>(row, kLambParam, kLambMaster, i, p, d.rounding);
        } else {
          const float pd = lamb_decayed(p[0], s);
          acc[0] += pd * pd;
          acc[1] += u * u;
        }
      });
    });
  }
  __device__ void visit_chunk(const TensorRow& row, int32_t chunk, const LambScalars<float>& s) const {
    Acc unused[2] = {0.0f, 0.0f};
    visit_chunk(row, chunk, s, unused);
  }
};

// LAMB pass 3 with 8-bit m, v.
template <class P>
struct LambQ8ApplyFunctor : LambBase {
  static constexpr bool kPrepareOnce = true;
  static constexpr bool kVisitsChunks = true;
  __device__ LambScalars<float> prepare(const TensorRow& r) const {
    const double* n = col<double>(r, kLambNorms);
    return scalars<float>(r, lamb_trust_ratio(h, n[0], n[1]));
  }
  __device__ void visit_chunk(const TensorRow& row, int32_t chunk, const LambScalars<float>& s) const {
    const int64_t n = row.numel;
    for_each_lamb_q8_block(row, chunk, [&](const auto&, const auto&, int64_t, int64_t base, int lane,
                                           float (&mv)[kPerLane], float (&vv)[kPerLane]) {
      for_each_lane_element(base, lane, n, [&](int k, int64_t i) {
        float p[1];
        load_param<1, P>(row, kLambParam, kLambMaster, i, p);
        p[0] = lamb_apply<float>(p[0], lamb_direction<float>(p[0], mv[k], vv[k], s), s);
        store_param<1, P>(row, kLambParam, kLambMaster, i, p, d.rounding);
      });
    });
  }
};

// The global grad norm from the fp64 per-grad sums of squares, added in the
// order of ops/combine.h as the CPU driver adds them -> the grad divisor.
struct LambClipCombine {
  const double* grad_sq;
  int64_t n;
  double* out;
  LambHyper h;
  const float* grad_scale;
  __device__ bool skip() const { return false; }
  __device__ int64_t count(int64_t) const { return n; }
  __device__ double item(int64_t, int64_t i) const { return grad_sq[i]; }
  __device__ void finish(int64_t, double s) const {
    *out = lamb_grad_divisor(h, s, grad_scale ? static_cast<double>(*grad_scale) : 1.0);
  }
};

}  // namespace

int64_t reduction_workspace_elems(const TensorRow* rows, int64_t n_rows, int quantities) {
  return reduction_blocks(rows, n_rows) * quantities;
}

void multi_tensor_norms(const NormsCall& call) {
  check_norms_out_dtype(call.out_dtype);
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  dispatch_float_dtype(call.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_reduce<1>(call.rows, call.n_rows, stream, NormsFunctor<T>{}, call.workspace, kNormsOut, call.out_dtype,
                     call.take_sqrt, nullptr);
  });
}

void multi_tensor_lars(const OptimCall& call, const LarsHyper& h, double* workspace) {
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  // 8-bit buffers (momentum != 0): the update is the 8-bit momentum kernel; no momentum, no buffer.
  const bool q8 = call.state_dtype == kInt8 && h.momentum != 0.0;
  if (q8) check_q8_param(call.param_dtype);
  dispatch_param_state(call.param_dtype, call.state_dtype == kInt8 ? kFloat32 : call.state_dtype,
                       [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    if (lars_adapts(h) && !(h.flags & kLarsNormsGiven))
      launch_reduce<2>(call.rows, call.n_rows, stream, LarsNormsFunctor<P>{device_scalars(call)}, workspace,
                       kLarsNorms, kFloat64, false, call.found_inf);
    if (h.flags & kLarsNormsOnly) return;
    if (q8) {
      if constexpr (!std::is_same_v<P, double>) launch_momentum_q8(call, LarsRule{h}, stream);
      return;
    }
    launch_elementwise(call.rows, call.n_rows, stream,
                       MomentumFunctor<P, S, LarsRule>{LarsRule{h}, device_scalars(call)});
  });
  if (!(h.flags & kLarsNormsOnly)) advance_steps(call.rows, call.n_rows, kLarsBufferAge, call.found_inf, stream);
}

void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const double* grad_sq, int64_t n_grad_sq,
                       double* workspace) {
  const bool moments_only = h.flags & kLambMomentsOnly, apply_only = h.flags & kLambApplyOnly;
  if ((moments_only || apply_only) && !lamb_adapts(h))
    throw std::invalid_argument("fusedopt: a split LAMB step needs a step that adapts (no norms otherwise)");
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  const double* clip = nullptr;
  double* partials = workspace;
  if (h.flags & kLambClipGrads) {
    launch_combine(LambClipCombine{grad_sq, n_grad_sq, workspace, h, call.grad_scale}, 1, stream);
    clip = workspace;
    partials = workspace + 1;
  }
  const LambBase base{h, device_scalars(call), clip};
  if (call.state_dtype == kInt8) {
    dispatch_q8_param(call.param_dtype, [&](auto ptag) {
      using P = typename decltype(ptag)::type;
      if (!lamb_adapts(h)) {
        launch_elementwise(call.rows, call.n_rows, stream, LambQ8MomentFunctor<P, true>{base});
      } else {
        if (!apply_only)
          launch_reduce<2>(call.rows, call.n_rows, stream, LambQ8MomentFunctor<P, false>{base}, partials, kLambNorms,
                           kFloat64, false, call.found_inf);
        if (!moments_only) launch_elementwise(call.rows, call.n_rows, stream, LambQ8ApplyFunctor<P>{base});
      }
    });
    if (!moments_only) advance_steps(call.rows, call.n_rows, kLambStep, call.found_inf, stream);
    return;
  }
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    if (!lamb_adapts(h)) {
      launch_elementwise(call.rows, call.n_rows, stream, LambMomentFunctor<P, S, true>{base});
    } else {
      // A split step (kLambMomentsOnly, then kLambApplyOnly) runs one pass per
      // call; the apply pass reads the norms column either way.
      if (!apply_only)
        launch_reduce<2>(call.rows, call.n_rows, stream, LambMomentFunctor<P, S, false>{base}, partials, kLambNorms,
                         kFloat64, false, call.found_inf);
      if (!moments_only) launch_elementwise(call.rows, call.n_rows, stream, LambApplyFunctor<P, S>{base});
    }
  });
  if (!moments_only) advance_steps(call.rows, call.n_rows, kLambStep, call.found_inf, stream);
}

}  // namespace fusedopt::cuda
