// Bindings of the per-tensor norms, LARS and LAMB entry points, and of the
// host combine order every reduction shares. Only conversions;
// python/fusedopt/_kernels/ checks every tensor first.
#include "../cpu/norm_scaled_cpu.h"
#include "../ops/combine.h"
#include "../cuda/cuda_api.h"
#include "bind_util.h"

namespace fusedopt::bind {

void register_norm_scaled(py::module_& m) {
  m.def(
      "cuda_reduction_workspace_elems",
      [](const RowArray& rows, int quantities) {
        int64_t n = 0;
        const TensorRow* r = rows_of(rows, &n);
        return cuda::reduction_workspace_elems(r, n, quantities);
      },
      "doubles of CUDA workspace a reduction of `quantities` sums per row over these rows needs");
  m.def(
      "fixed_order_sum",
      [](const py::array_t<double, py::array::c_style | py::array::forcecast>& x) {
        if (x.ndim() != 1) throw std::invalid_argument("fusedopt._C.fixed_order_sum: x must be 1-D");
        return fixed_order_sum(x.data(), x.shape(0));
      },
      "x[0] + ... + x[n-1] (float64) in the fixed combine order of csrc/ops/combine.h, the order in "
      "which both devices combine partial sums");
  m.def(
      "multi_tensor_norms",
      [](const RowArray& rows, int dtype, int out_dtype, int device, int64_t stream, int64_t workspace,
         bool take_sqrt) {
        NormsCall c{};
        c.rows = rows_of(rows, &c.n_rows);
        c.dtype = dtype;
        c.out_dtype = out_dtype;
        c.device = device;
        c.stream = ptr<void>(stream);
        c.workspace = ptr<double>(workspace);
        c.take_sqrt = take_sqrt;
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_norms(c) : cuda::multi_tensor_norms(c);
      },
      "sum of squares (or L2 norm) of every row's tensor: rows [input, out, ...]; out holds a float "
      "(out_dtype 0) or a double (out_dtype 3)");
  m.def(
      "multi_tensor_lars",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr, int64_t grad_scale_ptr,
         int64_t found_inf_ptr, int64_t stream, int64_t workspace, double lr, double momentum, double dampening,
         double weight_decay, double trust_coeff, double eps, int flags, bool stochastic_rounding,
         uint64_t rounding_seed, int64_t rounding_words) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream, stochastic_rounding, rounding_seed,
                                         rounding_words);
        const LarsHyper h{lr, momentum, dampening, weight_decay, trust_coeff, eps, flags};
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_lars(call, h) : cuda::multi_tensor_lars(call, h, ptr<double>(workspace));
      },
      "LARS over rows [param, grad, momentum_buffer, norms double[2], ...]");
  m.def(
      "multi_tensor_lamb",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr, int64_t grad_scale_ptr,
         int64_t found_inf_ptr, int64_t stream, int64_t workspace, int64_t grad_sq_ptr, int64_t n_grad_sq, double lr,
         double beta1, double beta2, double eps, double weight_decay, double max_grad_norm, int flags,
         bool stochastic_rounding, uint64_t rounding_seed, int64_t rounding_words) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream, stochastic_rounding, rounding_seed,
                                         rounding_words);
        const LambHyper h{lr, beta1, beta2, eps, weight_decay, max_grad_norm, flags};
        const double* grad_sq = ptr<const double>(grad_sq_ptr);
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_lamb(call, h, grad_sq, n_grad_sq)
                   : cuda::multi_tensor_lamb(call, h, grad_sq, n_grad_sq, ptr<double>(workspace));
      },
      "LAMB over rows [param, grad, exp_avg, exp_avg_sq, step, norms double[2], ...]; grad_sq: "
      "float64 per-grad sums of squares");
}

}  // namespace fusedopt::bind
