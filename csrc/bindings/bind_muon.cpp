// Muon's two elementwise passes (ops/muon.h): the momentum pass writes the
// buffer and the update direction; the apply pass decays the param and adds
// the orthogonalized update. Both take the common OptimCall head.
#include "../cpu/muon_cpu.h"
#include "../cuda/cuda_api.h"
#include "bind_util.h"

namespace fusedopt::bind {

void register_muon(py::module_& m) {
  const auto entry = [](bool apply) {
    return [apply](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr,
                   int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream, int update_dtype, double lr,
                   double momentum, double weight_decay, int flags) {
      const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                       found_inf_ptr, stream);
      const MuonHyper h{lr, momentum, weight_decay, flags};
      py::gil_scoped_release release;
      if (apply) {
        device < 0 ? cpu::multi_tensor_muon_apply(call, h, update_dtype)
                   : cuda::multi_tensor_muon_apply(call, h, update_dtype);
      } else {
        device < 0 ? cpu::multi_tensor_muon_momentum(call, h, update_dtype)
                   : cuda::multi_tensor_muon_momentum(call, h, update_dtype);
      }
    };
  };
  m.def("multi_tensor_muon_momentum", entry(false),
        "Muon momentum over rows [param, grad, momentum_buffer, update, master, lr_ratio, ...]: "
        "buf <- lerp(buf, g, 1 - momentum); update <- nesterov ? lerp(g, buf, momentum) : buf");
  m.def(
      "round_to_bf16_inplace",
      [](int64_t ptr, int64_t n) {
        py::gil_scoped_release release;
        cpu::round_to_bf16_inplace(reinterpret_cast<float*>(ptr), n);
      },
      "CPU: each of the n fp32 values at ptr rounded to the nearest bf16 (ties to even), in place");
  m.def("multi_tensor_muon_apply", entry(true),
        "Muon apply over the same rows: p <- p * (1 - lr * weight_decay) - lr * lr_ratio * update");
}

}  // namespace fusedopt::bind
