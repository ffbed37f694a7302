#include "../cpu/optim_cpu.h"
#include "../cuda/cuda_api.h"
#include "bind_util.h"

namespace fusedopt::bind {

void register_optim(py::module_& m) {
  m.def(
      "multi_tensor_adam",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr,
         int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream, double lr, double beta1,
         double beta2, double eps, double weight_decay, int flags) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream);
        const AdamHyper h{lr, beta1, beta2, eps, weight_decay, flags};
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_adam(call, h) : cuda::multi_tensor_adam(call, h);
      },
      "Adam/AdamW over rows [param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, master, -]");
  m.def(
      "multi_tensor_sgd",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr,
         int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream, double lr, double momentum,
         double dampening, double weight_decay, int flags) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream);
        const SgdHyper h{lr, momentum, dampening, weight_decay, flags};
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_sgd(call, h) : cuda::multi_tensor_sgd(call, h);
      },
      "SGD over rows [param, grad, momentum_buffer, master, ...]");
}

}  // namespace fusedopt::bind
