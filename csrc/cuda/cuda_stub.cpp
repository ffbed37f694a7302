// Linked instead of the .cu drivers when the build has no nvcc.
#include <stdexcept>

#include "cuda_api.h"

namespace fusedopt::cuda {
namespace {
[[noreturn]] void missing() { throw std::runtime_error("fusedopt was built without CUDA kernels"); }
}  // namespace
bool compiled() { return false; }
bool available() { return false; }
int device_count() { return 0; }
std::string archs() { return ""; }
void multi_tensor_sgd(const OptimCall&, const SgdHyper&) { missing(); }
void multi_tensor_adam(const OptimCall&, const AdamHyper&) { missing(); }
int64_t lanczos_chunk_elements() { missing(); }
void lanczos_dots(const LanczosCall&) { missing(); }
void lanczos_orthogonalize(const LanczosCall&) { missing(); }
}  // namespace fusedopt::cuda
