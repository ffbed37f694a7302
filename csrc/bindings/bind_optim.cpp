#include <algorithm>

#include "../cpu/optim_cpu.h"
#include "../cuda/cuda_api.h"
#include "../ops/quant8.h"
#include "../ops/stochastic_round.h"
#include "bind_util.h"

namespace fusedopt::bind {

namespace {

// ops/stochastic_round.h for the optimizer classes (the per-call seed) and for
// tests (the bits of a row, the rounding of given values with given bits).
void register_stochastic_rounding(py::module_& m) {
  m.def("rounding_call_seed", &rounding_call_seed, "the per-call stochastic-rounding seed of (seed, step, stream)");
  m.def(
      "rounding_bits",
      [](uint64_t call_seed, int64_t salt, int64_t count) {
        TensorRow row{};
        row.flags = salt << kRowSaltShift;
        const uint64_t key = rounding_row_key(call_seed, row);
        py::array_t<uint32_t> out(count);
        uint32_t* o = out.mutable_data();
        for (int64_t i = 0; i < count; ++i) o[i] = rounding_bits(key, i);
        return out;
      },
      "the random words of elements 0..count-1 of the row with this salt (its position in the call)");
  m.def(
      "stochastic_round",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& x,
         const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& random, int dtype) {
        if (x.ndim() != 1 || random.ndim() != 1 || x.shape(0) != random.shape(0))
          throw std::invalid_argument("fusedopt._C.stochastic_round: x and random must be 1-D of one length");
        if (dtype != kFloat16 && dtype != kBFloat16)
          throw std::invalid_argument("fusedopt._C.stochastic_round: dtype must be the float16 or bfloat16 code");
        py::array_t<uint16_t> out(x.shape(0));
        uint16_t* o = out.mutable_data();
        for (py::ssize_t i = 0; i < x.shape(0); ++i)
          o[i] = dtype == kFloat16 ? float_to_half_bits_stochastic(x.data()[i], random.data()[i])
                                   : float_to_bf16_bits_stochastic(x.data()[i], random.data()[i]);
        return out;
      },
      "the 16-bit patterns of float32 values x rounded stochastically with the given random words");
}

}  // namespace

void register_optim(py::module_& m) {
  register_stochastic_rounding(m);
  m.def(
      "quantize8",
      [](int64_t values, int64_t numel, int64_t codes, int64_t absmax, bool is_signed) {
        py::gil_scoped_release release;
        auto* v = reinterpret_cast<const float*>(values);
        auto* c = reinterpret_cast<uint8_t*>(codes);
        auto* a = reinterpret_cast<float*>(absmax);
        cpu::quantize8(v, numel, c, a, is_signed);
      },
      "fp32 values (host) -> 8-bit codes and per-block absmax (ops/quant8.h, the kernels' encoder)");
  m.def(
      "dequantize8",
      [](int64_t codes, int64_t absmax, int64_t numel, int64_t values, bool is_signed) {
        py::gil_scoped_release release;
        auto* c = reinterpret_cast<const uint8_t*>(codes);
        auto* a = reinterpret_cast<const float*>(absmax);
        auto* v = reinterpret_cast<float*>(values);
        cpu::dequantize8(c, a, numel, v, is_signed);
      },
      "8-bit codes and per-block absmax (host) -> fp32 values");
  m.def(
      "multi_tensor_adam",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr,
         int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream, double lr, double beta1,
         double beta2, double eps, double weight_decay, int flags, bool stochastic_rounding,
         uint64_t rounding_seed, int64_t rounding_words) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream, stochastic_rounding, rounding_seed,
                                         rounding_words);
        const AdamHyper h{lr, beta1, beta2, eps, weight_decay, flags};
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_adam(call, h) : cuda::multi_tensor_adam(call, h);
      },
      "Adam/AdamW over rows [param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, master, -]");
  m.def(
      "multi_tensor_sgd",
      [](const RowArray& rows, int param_dtype, int state_dtype, int device, int64_t lr_ptr,
         int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream, double lr, double momentum,
         double dampening, double weight_decay, int flags, bool stochastic_rounding, uint64_t rounding_seed,
         int64_t rounding_words) {
        const OptimCall call = make_call(rows, param_dtype, state_dtype, device, lr_ptr, grad_scale_ptr,
                                         found_inf_ptr, stream, stochastic_rounding, rounding_seed,
                                         rounding_words);
        const SgdHyper h{lr, momentum, dampening, weight_decay, flags};
        py::gil_scoped_release release;
        device < 0 ? cpu::multi_tensor_sgd(call, h) : cuda::multi_tensor_sgd(call, h);
      },
      "SGD over rows [param, grad, momentum_buffer, master, ...]");
}

}  // namespace fusedopt::bind
