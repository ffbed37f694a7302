#!/usr/bin/env bash
# Runs the CUDA tests under NVIDIA compute-sanitizer: memcheck (out-of-bounds
# and misaligned device accesses) and racecheck (shared-memory races).
# Needs a GPU machine with fusedopt installed with CUDA kernels
# (FUSEDOPT_CUDA=on) and compute-sanitizer on the PATH or under $CUDA_HOME/bin.
#
#   tools/run_compute_sanitizer.sh [pytest args...]   (default: the cuda-marked tests)
#   SANITIZER_TOOLS=memcheck tools/run_compute_sanitizer.sh ...   (one tool; default both)
#
# Fails when either tool reports an error or a test fails. The slow >2**31-element
# test is left out unless you pass --runslow yourself (it takes long under memcheck).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
[[ -x "$sanitizer" ]] || { echo "compute-sanitizer not found" >&2; exit 2; }
"$python" -c "import fusedopt, sys; sys.exit(0 if fusedopt.cuda_available() else 'no usable GPU / CUDA build')"
[[ $# -eq 0 ]] && set -- tests -q -m cuda
status=0
for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
  echo "=== compute-sanitizer --tool $tool ==="
  # --target-processes all: the fuzz test's child process is checked too.
  "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all --print-limit 20 \
    "$python" -m pytest -p no:cacheprovider "$@" || status=$?
  [[ $status -eq 0 ]] || { echo "compute-sanitizer $tool failed (exit $status)" >&2; exit $status; }
done
