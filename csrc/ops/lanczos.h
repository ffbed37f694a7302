// Vector work of the Lanczos method (python/fusedopt/hessian/lanczos.py), shared
// by the CPU and CUDA drivers. The kept basis is V: m rows of n elements, one
// contiguous row per basis vector (row j starts at basis + j * n).
//
//   dots:        out[j] = <V_j, w>                  for j < m
//   orthogonalize: w -= V^T h;  out[0] = ||w||_2   (h: m coefficients)
//
// Both read V once. Sums are in fp64 whatever the storage type. They are
// deterministic: the n elements are cut into fixed-size chunks (independent of
// the thread or block count), each chunk writes its own partial sums, and the
// partials are combined in the fixed order of combine.h.
#pragma once
#include <cstdint>

#include "common.h"

namespace fusedopt {

struct LanczosCall {
  const void* basis;   // V, m x n, contiguous rows, dtype
  int64_t m;           // basis vectors in use (may be 0 for orthogonalize: then only the norm)
  int64_t n;           // elements per vector
  void* w;             // the vector, n elements, dtype (written by orthogonalize only)
  const double* h;     // orthogonalize: m coefficients (device memory on CUDA)
  double* out;         // dots: m results; orthogonalize: 1 result (the norm)
  double* partials;    // workspace: n_chunks * max(m, 1) doubles
  int dtype;           // kFloat32 or kFloat64
  int device;          // -1: cpu
  void* stream;
};

// Last step of the orthogonalization of element i, given s = sum_j h_j V_ji:
// stores w_i - s and returns the square of the stored (rounded) value, so the
// norm is the norm of what the caller will read back.
template <class T>
FO_HD double lanczos_subtract_element(T& w, double s) {
  const T updated = static_cast<T>(static_cast<double>(w) - s);
  w = updated;
  const double u = static_cast<double>(updated);
  return u * u;
}

// Chunks the n elements are cut into; the workspace needs n_chunks * max(m, 1).
inline int64_t lanczos_num_chunks(int64_t n, int64_t chunk) { return n == 0 ? 0 : (n + chunk - 1) / chunk; }

}  // namespace fusedopt
