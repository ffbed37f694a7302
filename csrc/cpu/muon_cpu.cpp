// Compiled once per SIMD level (FUSEDOPT_SIMD_NS set by CMake). Muon's two
// elementwise passes over a call's rows; plain scalar loops over restrict
// pointers that the compiler vectorizes.
#include <algorithm>
#include <vector>

#include "../ops/dispatch.h"
#include "multi_tensor_cpu.h"
#include "muon_cpu.h"
#include "optim_cpu.h"

namespace fusedopt::cpu::FUSEDOPT_SIMD_NS {
namespace {

// Elements [b, e) of a row: the buffer moves and the update direction goes to
// the row's workspace slot. The param is not touched in this pass.
template <class P, class S, class U, class C>
void momentum_piece(const TensorRow& r, int64_t b, int64_t e, const MuonMomentumScalars<C> s) {
  const P* __restrict__ g = col<const P>(r, kMuonGrad);
  S* __restrict__ buf = col<S>(r, kMuonMomentumBuffer);
  U* __restrict__ upd = col<U>(r, kMuonUpdate);
  for (int64_t i = b; i < e; ++i) {
    C bv = load_as<S, C>(buf[i]);
    const C u = muon_momentum_element<C>(load_as<P, C>(g[i]), bv, s);
    store_as(buf[i], bv);
    store_as(upd[i], u);
  }
}

template <class P, class U, class C, bool kMaster>
void apply_piece(const TensorRow& r, int64_t b, int64_t e, const MuonApplyScalars<C> s) {
  const ParamIO<P, C, kMaster> p(r, kMuonParam, kMuonMaster);
  const U* __restrict__ upd = col<const U>(r, kMuonUpdate);
  for (int64_t i = b; i < e; ++i) {
    C pv = p.load(i);
    muon_apply_element<C>(pv, load_as<U, C>(upd[i]), s);
    p.store(i, pv);
  }
}

}  // namespace

void multi_tensor_muon_momentum(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  if (step_is_skipped(call)) return;
  const double divisor = grad_divisor(call);
  dispatch_param_state(call.param_dtype, call.state_dtype, [&](auto ptag, auto stag) {
    dispatch_muon_update_dtype(update_dtype, [&](auto utag) {
      using P = typename decltype(ptag)::type;
      using S = typename decltype(stag)::type;
      using U = typename decltype(utag)::type;
      using C = typename ComputeOf<P>::type;
      const MuonMomentumScalars<C> s = muon_momentum_scalars<C>(h, divisor);
      for_each_piece(call.rows, row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) {
        momentum_piece<P, S, U, C>(call.rows[r], b, e, s);
      });
    });
  });
}

void multi_tensor_muon_apply(const OptimCall& call, const MuonHyper& h, int update_dtype) {
  if (step_is_skipped(call)) return;
  const double lr = effective_lr(call, h.lr);
  dispatch_float_dtype(call.param_dtype, [&](auto ptag) {
    dispatch_muon_update_dtype(update_dtype, [&](auto utag) {
      using P = typename decltype(ptag)::type;
      using U = typename decltype(utag)::type;
      using C = typename ComputeOf<P>::type;
      std::vector<MuonApplyScalars<C>> scalars(static_cast<size_t>(call.n_rows));
      for (int64_t r = 0; r < call.n_rows; ++r)
        scalars[r] = muon_apply_scalars<C>(h, lr, *col<const double>(call.rows[r], kMuonLrRatio));
      const bool master = any_master(call, kMuonMaster);
      for_each_piece(call.rows, row_offsets(call.rows, call.n_rows), kCpuChunkElements,
                     [&](int64_t, int64_t r, int64_t b, int64_t e) {
        master ? apply_piece<P, U, C, true>(call.rows[r], b, e, scalars[r])
               : apply_piece<P, U, C, false>(call.rows[r], b, e, scalars[r]);
      });
    });
  });
}

// Every element of an fp32 buffer rounded to the nearest bf16 (ties to even; the
// conversion of ops/common.h, the one all kernels store bf16 with), in place: the
// bf16 Newton-Schulz matmuls on a CPU without bf16 units are fp32 matmuls whose
// outputs go through this, a few passes over a matrix per iteration (a round trip
// through a bf16 tensor took two copies, single-threaded, and dominated the step).
void round_to_bf16_inplace(float* data, int64_t n) {
  const int64_t chunks = (n + kCpuChunkElements - 1) / kCpuChunkElements;
  parallel_for(chunks, [&](int64_t c) {
    float* __restrict__ x = data + c * kCpuChunkElements;
    const int64_t m = std::min(kCpuChunkElements, n - c * kCpuChunkElements);
    for (int64_t i = 0; i < m; ++i) x[i] = round_as<BFloat16, float>(x[i]);
  });
}

}  // namespace fusedopt::cpu::FUSEDOPT_SIMD_NS
