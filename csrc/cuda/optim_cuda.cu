// CUDA drivers of SGD and Adam: functors over the shared per-element math
// (ops/sgd.h, ops/adam.h) run by the generic multi-tensor kernel; SGD's is the
// momentum loop it shares with LARS (momentum.cuh).
#include "../ops/dispatch.h"
#include "cuda_api.h"
#include "momentum.cuh"
#include "multi_tensor.cuh"
#include "quant8.cuh"

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
  static constexpr int kAbsmaxColumn = kSgdAbsmax;
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

// Per-row scalars of the 8-bit kernels, once per block (row_scalars).
struct AdamQ8Scalars {
  static constexpr bool kPrepareOnce = true;
  AdamHyper h;
  DeviceScalars d;
  __device__ AdamScalars<float> prepare(const TensorRow& r) const {
    return adam_scalars<float>(h, next_step(r, kAdamStep), d.lr(h.lr), d.divisor());
  }
};

// Adam with 8-bit moments: a warp decodes a block, steps it with adam_element
// and encodes it with its new absmax (quant8.cuh).
// With amsgrad a lane holds three moments' elements (3 x kPerLane floats): nvcc
// took 100-104 registers (30%); at kMinBlocksPerSM it spills 4-10 of them.
template <class P, bool kAmsgrad, class Table>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) adam_q8_kernel(const __grid_constant__ Table t,
                                                                            const AdamQ8Scalars f) {
  if (f.d.skip()) return;
  const BlockEntry be = t.blocks[blockIdx.x];
  const TensorRow& row = t.rows[be.row];
  const AdamScalars<float> s = row_scalars(f, row);
  const WarpQuantState<Code8::kSigned> m(row, kAdamExpAvg, kAdamAbsmax, 0);
  const WarpQuantState<Code8::kUnsigned> v(row, kAdamExpAvgSq, kAdamAbsmax, 1);
  const WarpQuantState<Code8::kUnsigned> vmax(row, kAdamMaxExpAvgSq, kAdamAbsmax, 2);
  const int64_t n = row.numel;
  for_each_warp_block(row, be.chunk, [&](int64_t q, int64_t base, int lane) {
    float mv[kPerLane], vv[kPerLane], vmv[kPerLane] = {};
    m.load(q, base, lane, n, mv);
    v.load(q, base, lane, n, vv);
    if (kAmsgrad) vmax.load(q, base, lane, n, vmv);
    for_each_lane_element(base, lane, n, [&](int k, int64_t i) {
      float p[1], g[1];
      load_param<1, P>(row, kAdamParam, kAdamMaster, i, p);
      load_elems<1>(col<P>(row, kAdamGrad), i, g);
      adam_element<float>(p[0], g[0], mv[k], vv[k], vmv[k], s);
      store_param<1, P>(row, kAdamParam, kAdamMaster, i, p, f.d.rounding);
    });
    m.store(q, base, lane, n, mv);
    v.store(q, base, lane, n, vv);
    if (kAmsgrad) vmax.store(q, base, lane, n, vmv);
  });
}

template <class Table>
__global__ void advance_steps_kernel(const __grid_constant__ Table t, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && !(found_inf && *found_inf != 0.0f)) *t.steps[i] += 1.0f;
}

}  // namespace

void advance_steps(const TensorRow* rows, int64_t n_rows, int step_column, const float* found_inf,
                   cudaStream_t stream) {
  StepTable t{};
  int n = 0;
  auto flush = [&] {
    if (n == 0) return;
    if (n <= SmallStepTable::kMaxSteps) {  // a few counters: 512 bytes of parameters, not 32 000
      SmallStepTable small{};
      for (int k = 0; k < n; ++k) small.steps[k] = t.steps[k];
      advance_steps_kernel<<<(n + 255) / 256, 256, 0, stream>>>(small, n, found_inf);
    } else {
      advance_steps_kernel<<<(n + 255) / 256, 256, 0, stream>>>(t, n, found_inf);
    }
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
  if (call.state_dtype == kInt8) {
    dispatch_q8_param(call.param_dtype, [&](auto ptag) {
      using P = typename decltype(ptag)::type;
      const AdamQ8Scalars f{h, device_scalars(call)};
      static_assert(sizeof(LaunchTable) + sizeof(AdamQ8Scalars) <= kMaxParamBytes,
                    "8-bit Adam kernel parameters must fit the parameter space");
      for (const PlannedLaunch& L : plan_launches(call.rows, call.n_rows)) {
        with_launch_table(L, [&](const auto& table) {
          using Table = std::decay_t<decltype(table)>;
          if (h.flags & kAdamAmsgrad) adam_q8_kernel<P, true, Table><<<L.n_blocks, kThreads, 0, stream>>>(table, f);
          else adam_q8_kernel<P, false, Table><<<L.n_blocks, kThreads, 0, stream>>>(table, f);
        });
      }
      check(cudaGetLastError(), "adam_q8 launch");
    });
    advance_steps(call.rows, call.n_rows, kAdamStep, call.found_inf, stream);
    return;
  }
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
  if (call.state_dtype == kInt8 && h.momentum != 0.0) {
    launch_momentum_q8(call, SgdRule{h}, stream);
    advance_steps(call.rows, call.n_rows, kSgdBufferAge, call.found_inf, stream);
    return;
  }
  // Without momentum there is no buffer: an 8-bit call is a plain one.
  const int state_dtype = call.state_dtype == kInt8 ? kFloat32 : call.state_dtype;
  dispatch_param_state(call.param_dtype, state_dtype, [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    launch_elementwise(call.rows, call.n_rows, stream,
                       MomentumFunctor<P, S, SgdRule>{SgdRule{h}, device_scalars(call)});
  });
  advance_steps(call.rows, call.n_rows, kSgdBufferAge, call.found_inf, stream);
}

}  // namespace fusedopt::cuda
