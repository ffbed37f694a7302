#include "../cpu/lanczos_cpu.h"
#include "../cuda/cuda_api.h"
#include "bind_util.h"

namespace fusedopt::bind {

namespace {
LanczosCall make_lanczos_call(int64_t basis, int64_t m, int64_t n, int64_t w, int64_t h, int64_t out,
                              int64_t partials, int dtype, int device, int64_t stream) {
  return LanczosCall{ptr<const void>(basis), m, n, ptr<void>(w), ptr<const double>(h), ptr<double>(out),
                     ptr<double>(partials), dtype, device, ptr<void>(stream)};
}
}  // namespace

void register_lanczos(py::module_& m) {
  m.def(
      "lanczos_chunk_elements",
      [](int device) { return device < 0 ? cpu::kLanczosCpuChunk : cuda::lanczos_chunk_elements(); },
      "Elements per chunk of the Lanczos kernels on this device (the workspace holds one partial per chunk and row)");
  m.def(
      "lanczos_dots",
      [](int64_t basis, int64_t rows, int64_t n, int64_t w, int64_t out, int64_t partials, int dtype, int device,
         int64_t stream) {
        const LanczosCall c = make_lanczos_call(basis, rows, n, w, 0, out, partials, dtype, device, stream);
        py::gil_scoped_release release;
        device < 0 ? cpu::lanczos_dots(c) : cuda::lanczos_dots(c);
      },
      "out[j] = <V_j, w> in fp64 for the first `rows` rows of the basis V");
  m.def(
      "lanczos_orthogonalize",
      [](int64_t basis, int64_t rows, int64_t n, int64_t w, int64_t h, int64_t out, int64_t partials, int dtype,
         int device, int64_t stream) {
        const LanczosCall c = make_lanczos_call(basis, rows, n, w, h, out, partials, dtype, device, stream);
        py::gil_scoped_release release;
        device < 0 ? cpu::lanczos_orthogonalize(c) : cuda::lanczos_orthogonalize(c);
      },
      "w -= V^T h over the first `rows` rows of V; out[0] = ||w|| (fp64)");
}

}  // namespace fusedopt::bind
