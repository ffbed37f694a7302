// CUDA drivers of Muon's two elementwise passes: functors over the shared
// per-element math (ops/muon.h) run by the generic multi-tensor kernel.
#include "../ops/dispatch.h"
#include "../ops/muon.h"
#include "cuda_api.h"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {
namespace {

// The vector width follows the narrowest element of the row (bf16 update next
// to fp32 params still moves 16 bytes of the param per packet).
template <class P, class S, class U>
struct MuonMomentumFunctor {
  using C = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  MuonHyper h;
  DeviceScalars d;
  __device__ bool skip() const { return d.skip(); }
  __device__ MuonMomentumScalars<C> prepare(const TensorRow&) const {
    return muon_momentum_scalars<C>(h, d.divisor());
  }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const MuonMomentumScalars<C>& s) const {
    C g[V], buf[V], u[V];
    load_elems<V>(col<P>(r, kMuonGrad), i, g);
    load_elems<V>(col<S>(r, kMuonMomentumBuffer), i, buf);
#pragma unroll
    for (int k = 0; k < V; ++k) u[k] = muon_momentum_element<C>(g[k], buf[k], s);
    store_elems<V>(col<S>(r, kMuonMomentumBuffer), i, buf);
    store_elems<V>(col<U>(r, kMuonUpdate), i, u);
  }
};

template <class P, class U>
struct MuonApplyFunctor {
  using C = typename ComputeOf<P>::type;
  static constexpr int kVec = 16 / sizeof(P);
  MuonHyper h;
  DeviceScalars d;
  __device__ bool skip() const { return d.skip(); }
  __device__ MuonApplyScalars<C> prepare(const TensorRow& r) const {
    return muon_apply_scalars<C>(h, d.lr(h.lr), *col<const double>(r, kMuonLrRatio));
  }
  template <int V>
  __device__ void apply(const TensorRow& r, int64_t i, const MuonApplyScalars<C>& s) const {
    C p[V], u[V];
    load_param<V, P>(r, kMuonParam, kMuonMaster, i, p);
    load_elems<V>(col<U>(r, kMuonUpdate), i, u);
#pragma unroll
    for (int k = 0; k < V; ++k) muon_apply_element<C>(p[k], u[k], s);
    store_param<V, P>(r, kMuonParam, kMuonMaster, i, p);
  }
};

}  // namespace

void multi_tensor_muon_momentum(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    dispatch_muon_update_dtype(update_dtype, [&](auto utag) {
      using P = typename decltype(ptag)::type;
      using S = typename decltype(stag)::type;
      using U = typename decltype(utag)::type;
      launch_elementwise(call.rows, call.n_rows, stream, MuonMomentumFunctor<P, S, U>{h, device_scalars(call)});
    });
  });
}

void multi_tensor_muon_apply(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  DeviceGuard guard(call.device);
  auto stream = static_cast<cudaStream_t>(call.stream);
  dispatch_float_dtype(call.param_dtype, [&](auto ptag) {
    dispatch_muon_update_dtype(update_dtype, [&](auto utag) {
      using P = typename decltype(ptag)::type;
      using U = typename decltype(utag)::type;
      launch_elementwise(call.rows, call.n_rows, stream, MuonApplyFunctor<P, U>{h, device_scalars(call)});
    });
  });
}

}  // namespace fusedopt::cuda
