// Per-tensor sums of squares (L2 norms), shared by the CPU and CUDA drivers.
// A norms call has one row per tensor: column 0 the tensor, column 1 a float*
// where its result goes. LARS and LAMB reuse the same reduction machinery with
// their own rows (see lars.h, lamb.h): every reducing pass leaves K float sums
// per row at the row's norms pointer.
#pragma once
#include "common.h"
#include "tensor_row.h"

namespace fusedopt {

enum NormsColumn { kNormsInput = 0, kNormsOut = 1 };

// Everything a norms call needs besides its rows.
struct NormsCall {
  const TensorRow* rows;
  int64_t n_rows;
  int dtype;           // DType of every input tensor of the call
  int device;          // -1: CPU, else CUDA ordinal
  void* stream;        // cudaStream_t on CUDA
  double* workspace;   // CUDA: one double per chunk (reduction_partials()); unused on CPU
  bool take_sqrt;      // write ||x|| (true) or sum(x^2) (false)
};

}  // namespace fusedopt
