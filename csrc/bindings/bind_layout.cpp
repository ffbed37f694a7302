// The row layout contract, exported by name: which pointer column of a row
// holds which tensor, what each flag bit means, the dtype codes and the order
// of each kernel's hyperparameters. Python (python/fusedopt/_kernels/layout.py)
// reads this table and refers to columns and flags only by these names, so the
// numbers live once, in the enums of csrc/ops.
#include <pybind11/stl.h>

#include "../ops/adam.h"
#include "../ops/lamb.h"
#include "../ops/lars.h"
#include "../ops/muon.h"
#include "../ops/norms.h"
#include "../ops/quant8.h"
#include "../ops/sgd.h"
#include "bind_util.h"

namespace fusedopt::bind {

namespace {

using Names = std::vector<std::pair<const char*, int64_t>>;

py::dict named(const Names& entries) {
  py::dict d;
  for (const auto& [name, value] : entries) d[py::str(name)] = value;
  return d;
}

// columns: pointer column of each tensor; flags: option bits of the kernel's
// `flags` argument; hyper: the float arguments after lr, in call order.
py::dict kernel(const Names& columns, const Names& flags, const std::vector<const char*>& hyper) {
  py::dict k;
  k["columns"] = named(columns);
  k["flags"] = named(flags);
  py::list h;
  for (const char* name : hyper) h.append(py::str(name));
  k["hyper"] = py::tuple(h);
  return k;
}

}  // namespace

void register_layout(py::module_& m) {
  py::dict kernels;
  kernels["sgd"] = kernel(
      {{"param", kSgdParam}, {"grad", kSgdGrad}, {"momentum_buffer", kSgdMomentumBuffer}, {"master", kSgdMaster},
       {"buffer_age", kSgdBufferAge}, {"absmax", kSgdAbsmax}},
      {{"nesterov", kSgdNesterov}, {"maximize", kSgdMaximize}},
      {"momentum", "dampening", "weight_decay"});
  kernels["adam"] = kernel(
      {{"param", kAdamParam}, {"grad", kAdamGrad}, {"exp_avg", kAdamExpAvg}, {"exp_avg_sq", kAdamExpAvgSq},
       {"max_exp_avg_sq", kAdamMaxExpAvgSq}, {"step", kAdamStep}, {"master", kAdamMaster},
       {"absmax", kAdamAbsmax}},
      {{"amsgrad", kAdamAmsgrad}, {"maximize", kAdamMaximize}, {"decoupled", kAdamDecoupled},
       {"eps_inside_sqrt", kAdamEpsInsideSqrt}},
      {"beta1", "beta2", "eps", "weight_decay"});
  kernels["lars"] = kernel(
      {{"param", kLarsParam}, {"grad", kLarsGrad}, {"momentum_buffer", kLarsMomentumBuffer}, {"norms", kLarsNorms},
       {"master", kLarsMaster}, {"buffer_age", kLarsBufferAge}, {"absmax", kLarsAbsmax}},
      {{"nesterov", kLarsNesterov}, {"trust_clip", kLarsTrustClip}, {"always_adapt", kLarsAlwaysAdapt},
       {"norms_only", kLarsNormsOnly}, {"norms_given", kLarsNormsGiven}},
      {"momentum", "dampening", "weight_decay", "trust_coeff", "eps"});
  kernels["lamb"] = kernel(
      {{"param", kLambParam}, {"grad", kLambGrad}, {"exp_avg", kLambExpAvg}, {"exp_avg_sq", kLambExpAvgSq},
       {"step", kLambStep}, {"norms", kLambNorms}, {"master", kLambMaster}, {"absmax", kLambAbsmax}},
      {{"bias_correction", kLambBiasCorrection}, {"grad_averaging", kLambGradAveraging},
       {"trust_clip", kLambTrustClip}, {"always_adapt", kLambAlwaysAdapt}, {"decoupled", kLambDecoupled},
       {"clip_grads", kLambClipGrads}, {"moments_only", kLambMomentsOnly}, {"apply_only", kLambApplyOnly}},
      {"beta1", "beta2", "eps", "weight_decay", "max_grad_norm"});
  kernels["muon"] = kernel(
      {{"param", kMuonParam}, {"grad", kMuonGrad}, {"momentum_buffer", kMuonMomentumBuffer},
       {"update", kMuonUpdate}, {"master", kMuonMaster}, {"lr_ratio", kMuonLrRatio}},
      {{"nesterov", kMuonNesterov}, {"update_bf16_values", kMuonUpdateBf16Values}},
      {"momentum", "weight_decay"});
  kernels["norms"] = kernel({{"input", kNormsInput}, {"out", kNormsOut}}, {}, {});

  py::dict layout;
  layout["row_width"] = static_cast<int64_t>(sizeof(TensorRow) / sizeof(int64_t));
  layout["pointer_columns"] = static_cast<int64_t>(kRowPointers);
  layout["numel_column"] = static_cast<int64_t>(offsetof(TensorRow, numel) / sizeof(int64_t));
  layout["flags_column"] = static_cast<int64_t>(offsetof(TensorRow, flags) / sizeof(int64_t));
  layout["row_flags"] = named({{"first_step", kRowFirstStep}, {"aligned16", kRowAligned16}});
  layout["row_salt_shift"] = static_cast<int64_t>(kRowSaltShift);
  layout["dtype_codes"] = named({{"float32", kFloat32}, {"float16", kFloat16}, {"bfloat16", kBFloat16},
                                 {"float64", kFloat64}, {"int8", kInt8}});
  layout["kernels"] = kernels;
  layout["quant_block"] = static_cast<int64_t>(kQuantBlock);
  m.attr("LAYOUT") = layout;
}

}  // namespace fusedopt::bind
