// Per-tensor sums of squares (L2 norms), shared by the CPU and CUDA drivers.
// A norms call has one row per tensor: column 0 the tensor, column 1 where its
// result goes (a float or a double, as the call's out_dtype says). LARS and
// LAMB reuse the same reduction machinery with their own rows (see lars.h,
// lamb.h): every reducing pass leaves K double sums per row at the row's norms
// pointer. Per-chunk partials are fp64 and are combined in the order of
// combine.h on both devices.
#pragma once
#include <stdexcept>
#include <string>

#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

enum NormsColumn { kNormsInput = 0, kNormsOut = 1 };

// Everything a norms call needs besides its rows.
struct NormsCall {
  const TensorRow* rows;
  int64_t n_rows;
  int dtype;           // DType of every input tensor of the call
  int out_dtype;       // kFloat32 or kFloat64: what each row's out pointer holds
  int device;          // -1: CPU, else CUDA ordinal
  void* stream;        // cudaStream_t on CUDA
  double* workspace;   // CUDA: one double per chunk (reduction_workspace_elems); unused on CPU
  bool take_sqrt;      // write ||x|| (true) or sum(x^2) (false)
};

inline void check_norms_out_dtype(int code) {
  if (code != kFloat32 && code != kFloat64)
    throw std::invalid_argument("fusedopt: norms out dtype must be float32 (0) or float64 (3); got " +
                                std::to_string(code));
}

// out[k] = v as the out dtype (kFloat64: the double itself; kFloat32: rounded).
FO_HD void store_norm(void* out, int out_dtype, int k, double v) {
  if (out_dtype == kFloat64) static_cast<double*>(out)[k] = v;
  else static_cast<float*>(out)[k] = static_cast<float>(v);
}

}  // namespace fusedopt
