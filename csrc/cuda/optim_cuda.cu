// CUDA drivers of SGD and Adam: functors over the shared per-element math
// (ops/sgd.h, ops/adam.h) run by the generic multi-tensor kernel; SGD's is the
// momentum loop it shares with LARS (momentum.cuh).
#include "../ops/dispatch.h"
#include "cuda_api.h"
#include "momentum.cuh"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {
namespace {


template <class P, class S>
struct AdamFunctor {
  using C = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  static constexpr bool kPrepareOnce = true;  // adam_scalars: two pow() per row
  AdamHyper h;
  DeviceScalars d;
  __device__ bool skip() const { return d.skip(); }
  __device__ AdamScalars<C> prepare(const TensorRow& r) const {
    return adam_scalars<C>(h, next_step(r, kAdamStep), d.lr(h.lr), d.divisor());
  }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const AdamScalars<C>& s) const {
    C p[V], g[V], m[V], v[V], vmax[V];
    load_param<V, P>(r, kAdamParam, kAdamMaster, i, p);
    load_elems<V>(col<P>(r, kAdamGrad), i, g);
    load_elems<V>(col<S>(r, kAdamExpAvg), i, m);
    load_elems<V>(col<S>(r, kAdamExpAvgSq), i, v);
    if (s.amsgrad != C(0)) load_elems<V>(col<S>(r, kAdamMaxExpAvgSq), i, vmax);
#pragma unroll
    for (int k = 0; k < V; ++k) adam_element<C>(p[k], g[k], m[k], v[k], vmax[k], s);
    store_param<V, P>(r, kAdamParam, kAdamMaster, i, p, d.rounding);
    store_elems<V>(col<S>(r, kAdamExpAvg), i, m);
    store_elems<V>(col<S>(r, kAdamExpAvgSq), i, v);
    if (s.amsgrad != C(0)) store_elems<V>(col<S>(r, kAdamMaxExpAvgSq), i, vmax);
  }
};

struct SgdRule {
  static constexpr MomentumColumns kColumns = kSgdColumns;
  SgdHyper h;
  template <class C>
  __device__ SgdScalars<C> scalars(const TensorRow&, const DeviceScalars& d) const {
    return sgd_scalars<C>(h, d.lr(h.lr), d.divisor());
  }
  template <class C>
  __device__ static void element(C& p, C g, C& buf, C first, const SgdScalars<C>& s) {
    sgd_element<C>(p, g, buf, first, s);
  }
};

__global__ void advance_steps_kernel(const __grid_constant__ StepTable t, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && !(found_inf && *found_inf != 0.0f)) *t.steps[i] += 1.0f;
}

}  // namespace

void advance_steps(const TensorRow* rows, int64_t n_rows, int step_column, const float* found_inf,
                   cudaStream_t stream) {
  StepTable t{};
  int n = 0;
  auto flush = [&] {
    if (n) advance_steps_kernel<<<(n + 255) / 256, 256, 0, stream>>>(t, n, found_inf);
    n = 0;
  };
  for (int64_t r = 0; r < n_rows; ++r) {
    if (rows[r].ptr[step_column] == 0) continue;  // an optional counter (SGD/LARS buffer ages)
    t.steps[n++] = reinterpret_cast<float*>(rows[r].ptr[step_column]);
    if (n == kMaxStepsPerLaunch) flush();
  }
  flush();
  check(cudaGetLastError(), "advance_steps launch");
}

void multi_tensor_adam(const OptimCall& call, const AdamHyper& h) {
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    launch_elementwise(call.rows, call.n_rows, stream, AdamFunctor<P, S>{h, device_scalars(call)});
  });
  advance_steps(call.rows, call.n_rows, kAdamStep, call.found_inf, stream);
}

void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h) {
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    launch_elementwise(call.rows, call.n_rows, stream,
                       MomentumFunctor<P, S, SgdRule>{SgdRule{h}, device_scalars(call)});
  });
  advance_steps(call.rows, call.n_rows, kSgdBufferAge, call.found_inf, stream);
}

}  // namespace fusedopt::cuda
