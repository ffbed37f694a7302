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
void multi_tensor_muon_momentum(const OptimCall&, const MuonHyper&, int) { missing(); }
void multi_tensor_muon_apply(const OptimCall&, const MuonHyper&, int) { missing(); }
int64_t lanczos_chunk_elements() { missing(); }
void lanczos_dots(const LanczosCall&) { missing(); }
void lanczos_orthogonalize(const LanczosCall&) { missing(); }
int64_t reduction_workspace_elems(const TensorRow*, int64_t, int) { missing(); }
void multi_tensor_norms(const NormsCall&) { missing(); }
void multi_tensor_lars(const OptimCall&, const LarsHyper&, double*) { missing(); }
void multi_tensor_lamb(const OptimCall&, const LambHyper&, const double*, int64_t, double*) { missing(); }
}  // namespace fusedopt::cuda
