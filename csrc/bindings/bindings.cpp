// The _C module: build information and the kernel entry points. Bindings only
// convert; every check on tensors happens in python/fusedopt/_kernels/.
#include <pybind11/stl.h>

#include "../common/chunk_table.h"
#include "../common/packet_tier.h"
#include "../cpu/simd.h"
#include "../cpu/thread_pool.h"
#include "../cuda/cuda_api.h"
#include "bind_util.h"

namespace fusedopt::bind {
void register_optim(py::module_& m);
void register_muon(py::module_& m);
void register_lanczos(py::module_& m);
void register_norm_scaled(py::module_& m);
void register_layout(py::module_& m);
void register_tensor_scan(py::module_& m);
}

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using namespace fusedopt;
  m.def("cuda_compiled", &cuda::compiled);
  m.def("cuda_available", &cuda::available);
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_archs", &cuda::archs);
  m.def("simd_level", [] { return std::string(cpu::simd_level_name()); });
  m.def("num_threads", &cpu::num_threads);
  m.def("set_num_threads", &cpu::set_num_threads);
  m.def(
      "build_chunk_table",
      [](const std::vector<int64_t>& numels, int64_t chunk, int max_rows, int max_blocks) {
        py::list out;
        for (const LaunchPlan& p : build_chunk_table(numels.data(), static_cast<int64_t>(numels.size()),
                                                     chunk, max_rows, max_blocks)) {
          py::list blocks;
          for (const BlockEntry& b : p.blocks) blocks.append(py::make_tuple(b.row, b.chunk));
          std::vector<bool> last(p.row_is_last.begin(), p.row_is_last.end());
          out.append(py::make_tuple(p.rows, last, blocks));
        }
        return out;
      },
      "The CUDA launch plan for tensors of these sizes: [(rows, row_is_last, [(row, chunk)])]");
  m.def(
      "packet_tier",
      [](uint64_t address, int elem_bytes, int vec) {
        // the kernels' element sizes; another value would loop to a word of 0 bytes
        if (!(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8) || vec < 1)
          throw py::value_error("packet_tier: elem_bytes must be 1, 2, 4 or 8 and vec >= 1; got elem_bytes=" +
                                std::to_string(elem_bytes) + ", vec=" + std::to_string(vec));
        return packet_tier(static_cast<uintptr_t>(address), elem_bytes, vec);
      },
      "The word size (16, 8, 4; 0: element by element) in which the CUDA vector path moves a column's "
      "packets of vec elements of elem_bytes at this base address (common/packet_tier.h)");
  bind::register_optim(m);
  bind::register_muon(m);
  bind::register_lanczos(m);
  bind::register_norm_scaled(m);
  bind::register_layout(m);
  bind::register_tensor_scan(m);
}
