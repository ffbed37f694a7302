// One row per tensor of a multi-tensor call: the pointers of the tensors that
// belong to one parameter (param, grad, states...), its element count and
// per-tensor flags. Python builds these rows (python/fusedopt/_kernels/rows.py);
// each op header names the meaning of its columns.
#pragma once
#include <cstdint>

namespace fusedopt {

constexpr int kRowPointers = 8;

struct TensorRow {
  int64_t ptr[kRowPointers];  // 0 where a column is unused
  int64_t numel;
  int64_t flags;
};
static_assert(sizeof(TensorRow) == 80, "rows are shared with Python as int64[n, 10]");

enum RowFlag : int64_t {
  kRowFirstStep = 1,    // SGD/LARS: momentum buffer is initialised from this step's update
  kRowAligned16 = 2,    // every pointer of the row is 16-byte aligned (informational: CUDA picks each column's tier, multi_tensor.cuh)
};
// Bits from here up of a row's flags: its salt for stochastic rounding (its
// position in the call; ops/stochastic_round.h row_salt).
constexpr int kRowSaltShift = 32;

// Stochastic rounding of 16-bit params without a master copy (ops/stochastic_round.h):
// off, or on with the call's seed. The seed is a host number (`seed`), or, where
// `words` is set, derived where the kernel runs from three int64 words in the
// kernel's memory (user seed, step, stream; call_seed_of): a CUDA graph replay then
// rounds with the step the words hold at replay time, not at capture time.
struct StochasticRounding {
  bool on;
  uint64_t seed;
  const int64_t* words;  // nullptr: use `seed`
};

// What every multi-tensor optimizer call shares besides its hyperparameters.
struct OptimCall {
  const TensorRow* rows;
  int64_t n_rows;
  int param_dtype;          // DType of params and grads
  int state_dtype;          // DType of moment/momentum states
  int device;               // -1: CPU, else CUDA ordinal
  const float* lr_ptr;      // optional device/host scalar overriding the float lr
  const float* grad_scale;  // optional: grads are divided by *grad_scale (AMP)
  const float* found_inf;   // optional: when *found_inf != 0 nothing is written
  void* stream;             // cudaStream_t on CUDA, unused on CPU
  StochasticRounding rounding;  // SGD, Adam, LARS, LAMB: how 16-bit params without master are stored
};

}  // namespace fusedopt
