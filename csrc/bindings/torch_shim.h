// Tensor metadata read in a few nanoseconds, for the per-step checks of
// python/fusedopt/_kernels/rows.py (issue 12: host overhead).
//
// Each Python attribute of a torch tensor (data_ptr(), dtype, shape, ...) costs
// 40-80 ns through torch's getters, several hundred ns for the checks a step
// makes on one tensor. torch's ABI-stable C shim (the aoti_torch_* functions
// of libtorch that AOTInductor-compiled models call) reads the same facts from
// the TensorImpl directly. The core still does not link libtorch: the
// functions are looked up at run time in the library `import torch` loaded,
// and when any is missing the Python checks run instead (same checks, slower).
#pragma once
#include <Python.h>

#include <cstdint>

namespace fusedopt::bind {

// What the per-step checks need to know of one tensor.
struct TensorFacts {
  int64_t data = 0;                // data_ptr(): storage address plus offset
  int dtype = -1;                  // fusedopt DType code (ops/common.h); -1 for any other dtype
  int device_type = -1;            // kShimCpu, kShimCuda, or -1 for any other device
  int device_index = -1;           // -1 on the CPU
  bool strided = false;            // the dense layout (not sparse, mkldnn, jagged)
  bool contiguous = false;         // is_contiguous() in the default memory format
  int64_t dim = 0;
  const int64_t* sizes = nullptr;    // borrowed from the tensor: valid while it lives unchanged
  const int64_t* strides = nullptr;  // the same
};

constexpr int kShimCpu = 0;
constexpr int kShimCuda = 1;

// Looks the shim functions up in the torch library at `path` (libtorch_cpu).
// False when the library or any function is missing; the shim then stays off.
bool torch_shim_load(const char* path);
bool torch_shim_loaded();
// Switches a loaded shim off (the Python checks then run) or back on.
void torch_shim_enable(bool on);

// The TensorImpl of a tensor object (its `_cdata`), or nullptr (never raises).
// Valid while the object lives and is not swapped (torch.utils.swap_tensors).
void* tensor_impl(PyObject* t);
// Reads the facts of a TensorImpl but `data`; false for a layout other than
// strided or when the shim reports an error.
bool read_impl_facts(void* impl, TensorFacts* out);
// data_ptr() of a strided TensorImpl: a separate call, since it reads the
// storage, another object (callers batch these reads so that they overlap).
bool read_impl_data(void* impl, int64_t* out);
// All of the above for one tensor object.
bool read_tensor_facts(PyObject* t, TensorFacts* out);

}  // namespace fusedopt::bind
