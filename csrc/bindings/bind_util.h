// Conversions shared by the binding files: Python ints -> pointers, the
// int64[n, 10] row array -> TensorRow*, and the GIL release around kernels.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "../ops/tensor_row.h"

namespace fusedopt::bind {
namespace py = pybind11;

using RowArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

inline const TensorRow* rows_of(const RowArray& a, int64_t* n) {
  if (a.ndim() != 2 || a.shape(1) != sizeof(TensorRow) / sizeof(int64_t))
    throw std::invalid_argument("fusedopt._C: rows must be an int64 array of shape [n, 10]");
  *n = a.shape(0);
  return reinterpret_cast<const TensorRow*>(a.data());
}

template <class T> T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

// Builds the OptimCall shared by all optimizer entry points.
inline OptimCall make_call(const RowArray& rows, int param_dtype, int state_dtype, int device,
                           int64_t lr_ptr, int64_t grad_scale_ptr, int64_t found_inf_ptr,
                           int64_t stream, bool stochastic_rounding = false, uint64_t rounding_seed = 0,
                           int64_t rounding_words = 0) {
  OptimCall c{};
  c.rows = rows_of(rows, &c.n_rows);
  c.param_dtype = param_dtype;
  c.state_dtype = state_dtype;
  c.device = device;
  c.lr_ptr = ptr<const float>(lr_ptr);
  c.grad_scale = ptr<const float>(grad_scale_ptr);
  c.found_inf = ptr<const float>(found_inf_ptr);
  c.stream = ptr<void>(stream);
  c.rounding = StochasticRounding{stochastic_rounding, rounding_seed, ptr<const int64_t>(rounding_words)};
  return c;
}

}  // namespace fusedopt::bind
