// Entry points of the CUDA drivers. When CUDA is not compiled these are
// defined in cuda_stub.cpp and throw, and available() is false.
#pragma once
#include <string>

#include "../ops/adam.h"
#include "../ops/lanczos.h"
#include "../ops/lamb.h"
#include "../ops/lars.h"
#include "../ops/muon.h"
#include "../ops/norms.h"
#include "../ops/sgd.h"

namespace fusedopt::cuda {

bool compiled();
bool available();        // compiled, a driver is present and a device is visible
int device_count();
std::string archs();     // e.g. "80;86;89;90;100;120"

void multi_tensor_sgd(const OptimCall& call, const SgdHyper& h);
void multi_tensor_adam(const OptimCall& call, const AdamHyper& h);
// Muon (muon_cuda.cu); update_dtype: DType of the update column.
void multi_tensor_muon_momentum(const OptimCall& call, const MuonHyper& h, int update_dtype);
void multi_tensor_muon_apply(const OptimCall& call, const MuonHyper& h, int update_dtype);

int64_t lanczos_chunk_elements();  // elements per block; the workspace needs one partial per chunk and row
void lanczos_dots(const LanczosCall& call);
void lanczos_orthogonalize(const LanczosCall& call);
// Per-tensor norms, LARS, LAMB (norm_scaled_cuda.cu). `workspace` holds
// reduction_workspace_elems(rows, K) doubles: K = 1 for norms, 2 for LARS,
// 2 (+1 when clipping grads) for LAMB.
int64_t reduction_workspace_elems(const TensorRow* rows, int64_t n_rows, int quantities);
void multi_tensor_norms(const NormsCall& call);
void multi_tensor_lars(const OptimCall& call, const LarsHyper& h, double* workspace);
void multi_tensor_lamb(const OptimCall& call, const LambHyper& h, const double* grad_sq, int64_t n_grad_sq,
                       double* workspace);

}  // namespace fusedopt::cuda
