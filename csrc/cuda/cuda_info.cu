#include <cuda_runtime.h>

#include "cuda_api.h"

namespace fusedopt::cuda {
bool compiled() { return true; }
int device_count() {
  int n = 0;
  // Fails cleanly (no driver, no device) on machines without a GPU.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}
bool available() { return device_count() > 0; }
std::string archs() { return FUSEDOPT_CUDA_ARCHS_STR; }
}  // namespace fusedopt::cuda
