#!/usr/bin/env bash
# Per CUDA kernel of a built fusedopt._C: registers, spills, occupancy bound and the widths of
# its global loads/stores (16-byte LDG.E.128 / STG.E.128 on the vector path), from cuobjdump.
#   tools/cuda_report.sh [path/to/_C*.so]     (default: the installed fusedopt's)
# cuobjdump and nvdisasm: the CUDA toolkit, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
# (their bin/ folders are found on PATH, or through CUOBJDUMP / NVDISASM_PATH).
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/cuda_report.py "$@"
