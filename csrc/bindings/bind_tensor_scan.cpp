// The per-step checks of a step plan in one C++ pass (issue 12: host overhead).
//
// A step whose row table was already built only needs to know that nothing
// changed: every param still has the storage, dtype, device, shape and
// contiguity its row was built with, and this step's grads match their params
// and share no byte with what the kernel writes. RowScanner answers that for
// one table and points the grad column at the new grads; when any answer is
// "no" it writes nothing and says false, and python/fusedopt/_kernels/rows.py
// runs its own checks, which re-plan or raise with the message naming the
// tensor. So this file may be stricter than the Python checks, never looser.
#include <algorithm>
#include <vector>

#include <pybind11/stl.h>

#include "bind_util.h"
#include "torch_shim.h"

namespace fusedopt::bind {
namespace {


PyObject* interned_grad() {
  static PyObject* name = PyUnicode_InternFromString("grad");
  return name;
}

// (grads, mask, same): the .grad of every param that has one, in order; a
// bytes object with 1 where a param has a grad; and whether `params` holds the
// very objects of the list `previous` (an optimizer's copy of a group's params
// from the last step), so that a cached plan can be reused without comparing
// them in Python.
py::tuple grads_of(py::handle params, py::handle previous) {
  py::list seq = PyList_Check(params.ptr()) ? py::reinterpret_borrow<py::list>(params) : py::list(py::reinterpret_borrow<py::object>(params));
  const Py_ssize_t n = PyList_GET_SIZE(seq.ptr());
  py::list grads;
  std::string bits(static_cast<size_t>(n), '\0');
  bool same = PyList_Check(previous.ptr()) && PyList_GET_SIZE(previous.ptr()) == n;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(seq.ptr(), i);
    if (same && PyList_GET_ITEM(previous.ptr(), i) != p) same = false;
    PyObject* g = PyObject_GetAttr(p, interned_grad());
    if (g == nullptr) throw py::error_already_set();
    if (g != Py_None) {
      bits[static_cast<size_t>(i)] = 1;
      if (PyList_Append(grads.ptr(), g) != 0) {
        Py_DECREF(g);
        throw py::error_already_set();
      }
    }
    Py_DECREF(g);
  }
  return py::make_tuple(grads, py::bytes(bits), same);
}

constexpr size_t kAhead = 8;  // rows prefetched ahead: enough misses in flight to hide the latency

// The first bytes of a TensorImpl, where its metadata lives.
inline void prefetch_impl(const void* impl) {
  const char* p = static_cast<const char*>(impl);
  for (int line = 0; line < 4; ++line) __builtin_prefetch(p + 64 * line);
}

// The checks of one row table, set up once when the table is built.
class RowScanner {
 public:
  RowScanner(py::array rows, int dtype, int device_type, int device_index, int param_column, int grad_column,
             const std::vector<std::vector<int64_t>>& shapes, const std::vector<std::vector<int64_t>>& layouts,
             std::vector<int64_t> written_starts,
             std::vector<int64_t> written_ends, int64_t element_size)
      : rows_(std::move(rows)), dtype_(dtype), device_type_(device_type), device_index_(device_index),
        param_column_(param_column), grad_column_(grad_column), starts_(std::move(written_starts)),
        ends_(std::move(written_ends)), element_size_(element_size) {
    // The table's own array, never a converted copy: refresh writes into it.
    if (!rows_.dtype().is(py::dtype::of<int64_t>()) || !(rows_.flags() & py::array::c_style) ||
        !rows_.writeable() || rows_.ndim() != 2 ||
        rows_.shape(1) != static_cast<py::ssize_t>(sizeof(TensorRow) / sizeof(int64_t)))
      throw std::invalid_argument("RowScanner: rows must be a writeable C-contiguous int64 array of shape [n, 10]");
    n_ = rows_.shape(0);
    if (static_cast<int64_t>(shapes.size()) != n_ || static_cast<int64_t>(layouts.size()) != n_ ||
        starts_.size() != ends_.size())
      throw std::invalid_argument("RowScanner: one shape and layout per row, and as many written starts as ends");
    offsets_.push_back(0);
    for (int64_t i = 0; i < n_; ++i) {
      const auto& shape = shapes[static_cast<size_t>(i)];
      const auto& layout = layouts[static_cast<size_t>(i)];
      if (!layout.empty() && layout.size() != shape.size())
        throw std::invalid_argument("RowScanner: a layout has one stride per dim");
      dims_.insert(dims_.end(), shape.begin(), shape.end());
      strides_.insert(strides_.end(), layout.begin(), layout.end());
      strided_rows_.push_back(!layout.empty());
      stride_offsets_.push_back(static_cast<int64_t>(strides_.size() - layout.size()));
      offsets_.push_back(static_cast<int64_t>(dims_.size()));
    }
  }

  // True when everything is unchanged (then the grad column and the aligned16
  // flags are updated); false when anything differs or cannot be read.
  //
  // The cost is memory latency: each tensor is three objects scattered over
  // the heap (the Python object, its TensorImpl, its storage), and a step's
  // tensors rarely stay in cache. So the reads go in passes, each of which
  // touches one kind of object for every tensor and prefetches a few rows
  // ahead, and the misses of consecutive rows overlap instead of queueing.
  bool refresh(py::handle params, py::handle grads) {
    if (!torch_shim_loaded() || !PyList_Check(params.ptr()) || !PyList_Check(grads.ptr()) ||
        PyList_GET_SIZE(params.ptr()) != n_ || PyList_GET_SIZE(grads.ptr()) != n_)
      return false;
    PyObject** ps = reinterpret_cast<PyListObject*>(params.ptr())->ob_item;
    PyObject** gs = reinterpret_cast<PyListObject*>(grads.ptr())->ob_item;
    const size_t n = static_cast<size_t>(n_);
    impls_.resize(2 * n);  // param i at 2i, grad i at 2i + 1
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        __builtin_prefetch(ps[i + kAhead]);
        __builtin_prefetch(gs[i + kAhead]);
      }
      if ((impls_[2 * i] = tensor_impl(ps[i])) == nullptr || (impls_[2 * i + 1] = tensor_impl(gs[i])) == nullptr)
        return false;
    }
    TensorFacts f;
    for (size_t k = 0; k < 2 * n; ++k) {
      if (k + 2 * kAhead < 2 * n) prefetch_impl(impls_[k + 2 * kAhead]);
      if (!read_impl_facts(impls_[k], &f) || !matches(f, static_cast<int64_t>(k / 2))) return false;
    }
    data_.resize(2 * n);
    for (size_t k = 0; k < 2 * n; ++k)
      if (!read_impl_data(impls_[k], &data_[k])) return false;
    TensorRow* rows = reinterpret_cast<TensorRow*>(rows_.mutable_data());
    for (size_t i = 0; i < n; ++i)
      if (data_[2 * i] != rows[i].ptr[param_column_] || overlaps_written(data_[2 * i + 1], rows[i].numel * element_size_))
        return false;
    for (size_t i = 0; i < n; ++i) {
      TensorRow& r = rows[i];
      r.ptr[grad_column_] = data_[2 * i + 1];
      bool aligned = true;
      for (int c = 0; c < kRowPointers; ++c) aligned = aligned && r.ptr[c] % 16 == 0;
      r.flags = aligned ? (r.flags | kRowAligned16) : (r.flags & ~int64_t{kRowAligned16});
    }
    return true;
  }

 private:
  // A dense tensor of the table's dtype and device with row i's shape and
  // memory layout: contiguous, or the row's strides (0 for a size-1 dim, where
  // any stride is the same; python/fusedopt/_kernels/checks.py layout_key).
  bool matches(const TensorFacts& f, int64_t i) const {
    if (!f.strided || f.dtype != dtype_ || f.device_type != device_type_ || f.device_index != device_index_)
      return false;
    const int64_t begin = offsets_[i], dim = offsets_[i + 1] - begin;
    if (f.dim != dim || !std::equal(dims_.begin() + begin, dims_.begin() + begin + dim, f.sizes)) return false;
    if (!strided_rows_[static_cast<size_t>(i)]) return f.contiguous;
    const int64_t* want = strides_.data() + stride_offsets_[static_cast<size_t>(i)];
    for (int64_t d = 0; d < dim; ++d)
      if (f.sizes[d] != 1 && f.strides[d] != want[d]) return false;
    return true;
  }

  // Whether [start, start + nbytes) shares a byte with a tensor the kernel
  // writes. The written ranges do not overlap (RowTable.check_no_overlap), so
  // sorted by start their ends are sorted too: one binary search.
  bool overlaps_written(int64_t start, int64_t nbytes) const {
    if (nbytes <= 0 || starts_.empty()) return false;
    const auto k = std::lower_bound(starts_.begin(), starts_.end(), start + nbytes) - starts_.begin() - 1;
    return k >= 0 && ends_[static_cast<size_t>(k)] > start;
  }

  py::array rows_;  // the table's own array: refresh writes its grad column and flags
  int64_t n_ = 0;
  int dtype_, device_type_, device_index_, param_column_, grad_column_;
  std::vector<int64_t> dims_, offsets_;  // row i's shape: dims_[offsets_[i] : offsets_[i + 1]]
  std::vector<int64_t> strides_, stride_offsets_;  // a non-contiguous row's strides, from stride_offsets_[i]
  std::vector<bool> strided_rows_;                 // whether row i is non-contiguous
  std::vector<int64_t> starts_, ends_;
  int64_t element_size_;
  std::vector<void*> impls_;    // scratch of refresh: TensorImpls, then data pointers
  std::vector<int64_t> data_;
};

py::object tensor_facts(py::handle t) {
  TensorFacts f;
  if (!read_tensor_facts(t.ptr(), &f)) return py::none();
  py::tuple sizes(static_cast<size_t>(f.dim)), strides(static_cast<size_t>(f.dim));
  for (int64_t d = 0; d < f.dim; ++d) {
    sizes[static_cast<size_t>(d)] = f.sizes[d];
    strides[static_cast<size_t>(d)] = f.strides[d];
  }
  return py::make_tuple(f.data, f.dtype, f.device_type, f.device_index, f.contiguous, sizes, strides);
}

}  // namespace

void register_tensor_scan(py::module_& m) {
  m.def("torch_shim_load", [](const std::string& path) { return torch_shim_load(path.c_str()); },
        "Looks up torch's C shim in the torch library at this path; True when every function was found");
  m.def("torch_shim_enable", &torch_shim_enable, "Switches the shim path off (False) or back on (True)");
  m.def("torch_shim_active", &torch_shim_loaded);
  m.def("tensor_facts", &tensor_facts,
        "(data_ptr, fusedopt dtype code or -1, device type (0 cpu, 1 cuda, -1 other), device index, "
        "contiguous, sizes, strides) read through the shim, or None when it cannot read t");
  m.def("grads_of", &grads_of, py::arg("params"), py::arg("previous"),
        "(grads of the params that have one, mask bytes, whether params is the same objects as previous)");
  py::class_<RowScanner>(m, "RowScanner")
      .def(py::init<py::array, int, int, int, int, int, const std::vector<std::vector<int64_t>>&,
                    const std::vector<std::vector<int64_t>>&, std::vector<int64_t>, std::vector<int64_t>, int64_t>(),
           py::arg("rows"), py::arg("dtype"), py::arg("device_type"), py::arg("device_index"),
           py::arg("param_column"), py::arg("grad_column"), py::arg("shapes"), py::arg("layouts"),
           py::arg("written_starts"),
           py::arg("written_ends"), py::arg("element_size"))
      .def("refresh", &RowScanner::refresh, py::arg("params"), py::arg("grads"));
}

}  // namespace fusedopt::bind
