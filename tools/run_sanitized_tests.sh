#!/usr/bin/env bash
# Builds fusedopt's CPU code with AddressSanitizer + UBSan (FUSEDOPT_SANITIZE=ON,
# no CUDA) into its own venv and build dir, and runs the CPU tests under it.
# Fails on any sanitizer report (ASan/UBSan abort the process; the log is also
# scanned). Python's own leaks are noise, so leak detection is off.
#
#   tools/run_sanitized_tests.sh [pytest args...]   (default: tests -q)
#
# Environment: SAN_VENV (default .san-venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SAN_VENV:-.san-venv}
python=${PYTHON:-python3}

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv --system-site-packages "$venv"
fi
# --no-build-isolation (so the sanitizer flags reach this build dir) builds with what the venv
# sees: a machine that installed fusedopt with pip's default build isolation has no
# scikit-build-core outside it, so pyproject's [build-system] requirements are installed here.
if ! "$venv/bin/python" -c "import scikit_build_core, pybind11" 2>/dev/null; then
  read -r -a build_requires < <(sed -n 's/^requires = \[\(.*\)\]$/\1/p' pyproject.toml | tr -d '",')
  "$venv/bin/python" -m pip install -q "${build_requires[@]}"
fi
# pybind11's CMake files named outright: not every pybind11 install registers them where
# scikit-build-core looks (pybind11 3.1 from pip here registered no cmake entry point).
pybind11_dir=$("$venv/bin/python" -c "import pybind11; print(pybind11.get_cmake_dir())")
FUSEDOPT_SANITIZE=ON FUSEDOPT_CUDA=off "$venv/bin/python" -m pip install --no-build-isolation -q \
  --config-settings=build-dir=build/sanitize --config-settings=cmake.build-type=RelWithDebInfo \
  --config-settings=cmake.define.pybind11_DIR="$pybind11_dir" .

libasan=$(g++ -print-file-name=libasan.so)
libubsan=$(g++ -print-file-name=libubsan.so)
if [[ ! -e "$libasan" ]]; then
  echo "libasan.so not found (g++ -print-file-name=libasan.so gave '$libasan')" >&2
  exit 2
fi
log=$(mktemp -d)/sanitizer
# The interpreter is not instrumented, so the runtimes are preloaded; reports
# go to $log.<pid> as well as stderr.
export LD_PRELOAD="$libasan ${libubsan:+$libubsan}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$log:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$log"
export FUSEDOPT_SANITIZED=1  # tests/test_memory.py skips: ASan's quarantine grows RSS
# The child processes of the fuzz test inherit all of this.
[[ $# -eq 0 ]] && set -- tests -q
status=0
(cd /tmp && "$OLDPWD/$venv/bin/python" -c "import fusedopt, sys; print('sanitized build:', fusedopt.__file__)")
"$venv/bin/python" -m pytest -p no:cacheprovider "$@" || status=$?
unset LD_PRELOAD
if compgen -G "$log.*" > /dev/null; then
  echo "=== sanitizer reports ===" >&2
  cat "$log".* >&2
  exit 1
fi
exit $status
