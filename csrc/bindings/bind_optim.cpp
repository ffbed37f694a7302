#include <algorithm>

#include "../cpu/optim_cpu.h"
#include "../cuda/cuda_api.h"
#include "../ops/quant8.h"
#include "bind_util.h"

namespace fusedopt::bind {

namespace {

// Host conversions between fp32 values and 8-bit blockwise states, with the
// codes of ops/quant8.h (checkpoint loading and dequantized_state_dict; never
// on a step's path). The element order is the memory order of the state.
template <Code8 K>
void quantize_blocks(const float* values, int64_t numel, uint8_t* codes, float* absmax) {
  for (int64_t blk = 0; blk < quant_blocks(numel); ++blk) {
    const int64_t b = blk * kQuantBlock, e = std::min(b + kQuantBlock, numel);
    float scale = 0.0f;
    for (int64_t i = b; i < e; ++i) scale = absmax_with(scale, values[i]);
    scale = block_scale(scale);
    absmax[blk] = scale;
    const float inv = quant_inverse(scale);
    for (int64_t i = b; i < e; ++i) codes[i] = encode8<K>(values[i] * inv);
  }
}

template <Code8 K>
void dequantize_blocks(const uint8_t* codes, const float* absmax, int64_t numel, float* values) {
  for (int64_t i = 0; i < numel; ++i) values[i] = decode8<K>(codes[i]) * absmax[i / kQuantBlock];
}

}  // namespace

void register_optim(py::module_& m) {
  m.def(
      "quantize8",
      [](int64_t values, int64_t numel, int64_t codes, int64_t absmax, bool is_signed) {
        py::gil_scoped_release release;
        auto* v = reinterpret_cast<const float*>(values);
        auto* c = reinterpret_cast<uint8_t*>(codes);
        auto* a = reinterpret_cast<float*>(absmax);
        is_signed ? quantize_blocks<Code8::kSigned>(v, numel, c, a) : quantize_blocks<Code8::kUnsigned>(v, numel, c, a);
      },
      "fp32 values (host) -> 8-bit codes and per-block absmax (ops/quant8.h)");
  m.def(
      "dequantize8",
      [](int64_t codes, int64_t absmax, int64_t numel, int64_t values, bool is_signed) {
        py::gil_scoped_release release;
        auto* c = reinterpret_cast<const uint8_t*>(codes);
        auto* a = reinterpret_cast<const float*>(absmax);
        auto* v = reinterpret_cast<float*>(values);
        is_signed ? dequantize_blocks<Code8::kSigned>(c, a, numel, v) : dequantize_blocks<Code8::kUnsigned>(c, a, numel, v);
      },
      "8-bit codes and per-block absmax (host) -> fp32 values");
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
