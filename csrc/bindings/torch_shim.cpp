// Run-time lookup of torch's C shim (see torch_shim.h). The signatures are
// those of torch/csrc/inductor/aoti_torch/c/shim.h, which torch keeps ABI
// stable for AOTInductor models built against older releases.
#include "torch_shim.h"

#include <atomic>

#include "../ops/common.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define FUSEDOPT_HAVE_DLOPEN 1
#endif

namespace fusedopt::bind {
namespace {

// AtenTensorHandle is a pointer to an at::Tensor, and an at::Tensor is one
// intrusive_ptr<TensorImpl>, itself one TensorImpl pointer: the address of a
// variable holding the TensorImpl pointer (a tensor's `_cdata`) is a handle.
// The shim's getters only read through it. tests/test_host_overhead.py checks
// every fact against the Python attributes.
using Handle = void*;
using Error = int32_t;  // 0: success

struct Shim {
  Error (*data_ptr)(Handle, void**);
  Error (*dtype)(Handle, int32_t*);
  Error (*device_type)(Handle, int32_t*);
  Error (*device_index)(Handle, int32_t*);
  Error (*layout)(Handle, int32_t*);
  Error (*dim)(Handle, int64_t*);
  Error (*sizes)(Handle, int64_t**);
  Error (*strides)(Handle, int64_t**);
  Error (*is_contiguous)(Handle, bool*);
  int32_t float32, float16, bfloat16, float64;  // torch's ScalarType codes
  int32_t cpu, cuda, strided;                   // DeviceType and Layout codes
};

Shim g_shim;
std::atomic<bool> g_loaded{false};
std::atomic<bool> g_enabled{false};
PyObject* g_cdata = nullptr;  // interned "_cdata"

#ifdef FUSEDOPT_HAVE_DLOPEN
template <class F> bool find(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

bool code(void* lib, const char* name, int32_t* out) {
  int32_t (*fn)() = nullptr;
  if (!find(lib, name, &fn)) return false;
  *out = fn();
  return true;
}
#endif

}  // namespace

bool torch_shim_load(const char* path) {
#ifdef FUSEDOPT_HAVE_DLOPEN
  if (g_loaded.load()) return true;
  // The library is already loaded by `import torch`; RTLD_NOLOAD only finds it.
  void* lib = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return false;
  Shim s{};
  const bool ok = find(lib, "aoti_torch_get_data_ptr", &s.data_ptr) && find(lib, "aoti_torch_get_dtype", &s.dtype) &&
                  find(lib, "aoti_torch_get_device_type", &s.device_type) &&
                  find(lib, "aoti_torch_get_device_index", &s.device_index) &&
                  find(lib, "aoti_torch_get_layout", &s.layout) && find(lib, "aoti_torch_get_dim", &s.dim) &&
                  find(lib, "aoti_torch_get_sizes", &s.sizes) && find(lib, "aoti_torch_get_strides", &s.strides) &&
                  find(lib, "aoti_torch_is_contiguous", &s.is_contiguous) &&
                  code(lib, "aoti_torch_dtype_float32", &s.float32) &&
                  code(lib, "aoti_torch_dtype_float16", &s.float16) &&
                  code(lib, "aoti_torch_dtype_bfloat16", &s.bfloat16) &&
                  code(lib, "aoti_torch_dtype_float64", &s.float64) &&
                  code(lib, "aoti_torch_device_type_cpu", &s.cpu) &&
                  code(lib, "aoti_torch_device_type_cuda", &s.cuda) &&
                  code(lib, "aoti_torch_layout_strided", &s.strided);
  if (!ok) return false;  // the handle stays open: torch keeps the library loaded anyway
  g_cdata = PyUnicode_InternFromString("_cdata");
  if (g_cdata == nullptr) {
    PyErr_Clear();
    return false;
  }
  g_shim = s;
  g_loaded.store(true);
  g_enabled.store(true);
  return true;
#else
  (void)path;
  return false;
#endif
}

bool torch_shim_loaded() { return g_loaded.load() && g_enabled.load(); }

void torch_shim_enable(bool on) { g_enabled.store(on && g_loaded.load()); }

void* tensor_impl(PyObject* t) {
  if (!torch_shim_loaded()) return nullptr;
  PyObject* cdata = PyObject_GetAttr(t, g_cdata);
  if (cdata == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  void* impl = PyLong_AsVoidPtr(cdata);
  Py_DECREF(cdata);
  if (impl == nullptr) PyErr_Clear();
  return impl;
}

bool read_impl_facts(void* impl, TensorFacts* out) {
  void* cell = impl;
  const Handle h = &cell;
  const Shim& s = g_shim;
  int32_t layout = 0, dtype = 0, device_type = 0, device_index = 0;
  int64_t *sizes = nullptr, *strides = nullptr;
  bool contiguous = false;
  if (s.layout(h, &layout) != 0 || layout != s.strided) return false;  // data_ptr() of sparse tensors throws
  if (s.dtype(h, &dtype) != 0 || s.device_type(h, &device_type) != 0 || s.device_index(h, &device_index) != 0 ||
      s.dim(h, &out->dim) != 0 || s.sizes(h, &sizes) != 0 || s.strides(h, &strides) != 0 ||
      s.is_contiguous(h, &contiguous) != 0)
    return false;
  out->strided = true;
  out->dtype = dtype == s.float32    ? kFloat32
               : dtype == s.float16  ? kFloat16
               : dtype == s.bfloat16 ? kBFloat16
               : dtype == s.float64  ? kFloat64
                                     : -1;
  out->device_type = device_type == s.cpu ? kShimCpu : device_type == s.cuda ? kShimCuda : -1;
  out->device_index = out->device_type == kShimCpu ? -1 : device_index;
  out->contiguous = contiguous;
  out->sizes = sizes;
  out->strides = strides;
  return true;
}

bool read_impl_data(void* impl, int64_t* out) {
  void* cell = impl;
  void* data = nullptr;
  if (g_shim.data_ptr(&cell, &data) != 0) return false;
  *out = reinterpret_cast<int64_t>(data);
  return true;
}

bool read_tensor_facts(PyObject* t, TensorFacts* out) {
  void* impl = tensor_impl(t);
  return impl != nullptr && read_impl_facts(impl, out) && read_impl_data(impl, &out->data);
}

}  // namespace fusedopt::bind
