#!/usr/bin/env bash
# GPU validation in one command (issue 17): build for sm_90, CUDA tests, compute-sanitizer,
# quick GPU benchmarks, RESULTS.md, summary. Made for a lent H200 machine where GPU time is
# scarce: every stage has its own budget under `timeout`, and each budget is clamped to what
# is left of the whole run's (GPU_CHECK_TOTAL_S), so the script ends in time even when a stage
# hangs; a stage that runs out of time is reported as "timed out" and the next one still runs.
#
#   tools/gpu_check.sh OUTDIR
#
# OUTDIR gets at most 5 small files (the device tool brings back 8 at most):
#   gpu_check.log  every stage's output, one section each (long ones cut to head + tail)
#   summary.txt    one line per stage: ok / failed (exit N) / timed out / skipped: ..., seconds
#   env.json       device, driver, memory, nvcc, python, torch, commit
#   bench_cuda.json, RESULTS.md   the benchmark numbers and their table (only when measured)
#
# Knobs (environment):
#   GPU_CHECK_TOTAL_S        whole-run budget, default 470 (8 minutes less a margin)
#   GPU_CHECK_BUDGET_<STAGE> a stage's budget in seconds (STAGE upper-case, '-' as '_')
#   GPU_CHECK_BUILD=dry-run  print the build command instead of running it (CPU tests)
#   GPU_CHECK_STAGES="a b"   run only these stages (a rerun of the failed ones; build is needed
#                            on a fresh machine all the same)
#   GPU_CHECK_SLEEP_<STAGE>  run `sleep N` in place of that stage (tests of the timeouts)
#   GPU_CHECK_ASSUME_GPU=1   run the CUDA stages even where no GPU is seen (tests: they must fail)
#   GPU_CHECK_COMMIT         the commit to record where the tree has no .git (a copied checkout)
#   PYTHON                   the interpreter (default python3)
set -u
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)
py=${PYTHON:-python3}
command -v nvcc >/dev/null || PATH=$PATH:/usr/local/cuda/bin  # the CUDA image keeps nvcc there
export PYTHONUNBUFFERED=1

start=$SECONDS
total=${GPU_CHECK_TOTAL_S:-470}
work=$(mktemp -d)  # per-stage logs, folded into gpu_check.log; never under OUTDIR (8-file limit)
trap 'rm -rf "$work"' EXIT
log=$out/gpu_check.log summary=$out/summary.txt
# OUTDIR holds this run's files only: a bench_cuda.json left by an earlier run must not be rendered.
rm -f "$log" "$summary" "$out/env.json" "$out/bench_cuda.json" "$out/RESULTS.md"
: >"$log"; : >"$summary"
failures=0

# A GPU is there when nvidia-smi lists one and torch can use it; the CUDA stages need both.
has_gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 &&
   "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  has_gpu=1
fi
has_gpu=${GPU_CHECK_ASSUME_GPU:-$has_gpu}  # tests: run the GPU stages' plumbing on a CPU machine

budget_of() {  # budget_of STAGE DEFAULT: the override, clamped to the time left (5 s kept for the summary)
  local var=GPU_CHECK_BUDGET_${1^^}; var=${var//-/_}
  local want=${!var:-$2} left=$((total - (SECONDS - start) - 5))
  ((left < 1)) && left=1
  echo $((want < left ? want : left))
}

fold_log() {  # append a stage's log to gpu_check.log; a long one is cut to its head and tail
  local name=$1 file=$2
  printf '\n===== %s =====\n' "$name" >>"$log"
  if (($(wc -c <"$file") > 200000)); then
    head -c 20000 "$file" >>"$log"
    printf '\n... [cut: %s bytes in all] ...\n' "$(wc -c <"$file")" >>"$log"
    tail -c 150000 "$file" >>"$log"
  else
    cat "$file" >>"$log"
  fi
}

record() {  # record STAGE STATUS SECONDS
  printf '%-12s %-28s %4ss\n' "$1" "$2" "$3" | tee -a "$summary"
}

# stage NAME DEFAULT_BUDGET NEEDS_GPU FUNCTION: run FUNCTION under timeout, log it, record it.
stage() {
  local name=$1 default=$2 needs_gpu=$3 fn=$4 t0=$SECONDS status rc
  local file=$work/$name.log
  : >"$file"
  local sleep_var=GPU_CHECK_SLEEP_${name^^}; sleep_var=${sleep_var//-/_}
  if [[ -n ${GPU_CHECK_STAGES:-} && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
    record "$name" "not run (GPU_CHECK_STAGES)" 0
    return
  fi
  if [[ $needs_gpu == 1 && $has_gpu == 0 && -z ${!sleep_var:-} ]]; then
    echo "skipped: no GPU" >"$file"
    status="skipped: no GPU"
  else
    local budget; budget=$(budget_of "$name" "$default")
    echo "[budget ${budget}s]" >>"$file"
    # timeout puts the stage in its own process group and signals all of it (pytest under
    # compute-sanitizer too); -k: KILL 5 s after TERM for whatever ignores TERM.
    if [[ -n ${!sleep_var:-} ]]; then
      timeout -k 5 "$budget" sleep "${!sleep_var}" >>"$file" 2>&1
    else
      timeout -k 5 "$budget" bash -c "$(declare -f); $(declare -p py root out has_gpu); $fn" >>"$file" 2>&1
    fi
    rc=$?
    # 124: timeout's TERM; 137: its KILL, or the kernel's OOM killer when the budget is not up yet.
    if ((rc == 124 || (rc == 137 && SECONDS - t0 >= budget))); then
      status="timed out (${budget}s)"; failures=$((failures + 1))
    elif ((rc == 0)); then status=ok
    elif ((rc == 77)); then status="skipped: $(tail -n 1 "$file")"  # 77: the stage said why it skipped
    else status="failed (exit $rc)"; failures=$((failures + 1)); fi
  fi
  fold_log "$name" "$file"
  record "$name" "$status" $((SECONDS - t0))
}

# ---- the stages ------------------------------------------------------------------------------------
env_stage() {
  set -o pipefail
  # Queries only: no card setting is touched (no -pm, -pl, -ac, -lgc, -r, ...).
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
  command -v nvcc >/dev/null && nvcc --version | grep release
  "$py" - "$out/env.json" <<'EOF'
import json, os, platform, shutil, subprocess, sys, torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
name, driver, memory = ([s.strip() for s in smi.splitlines()[0].split(",")] + [None] * 3)[:3] if smi else (None, None, None)
nvcc = run(["nvcc", "--version"]) if shutil.which("nvcc") else None
# A copied working tree may come without .git: then the caller's GPU_CHECK_COMMIT names the code.
commit = run(["git", "rev-parse", "--short", "HEAD"])
if commit and run(["git", "status", "--porcelain", "--untracked-files=no"]):
    commit += "+dirty"
commit = commit or os.environ.get("GPU_CHECK_COMMIT") or "unknown"
env = {"gpu": name, "driver": driver, "gpu_memory": memory, "nvcc": next((l for l in nvcc.splitlines() if "release" in l), None) if nvcc else None,
       "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "commit": commit}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF
}

build_stage() {
  # sm_90 only: one architecture compiles in a fraction of the default list's time. No
  # dependencies are fetched (the machine reaches no registry; torch and numpy are there).
  local cmd=("$py" -m pip install --no-build-isolation --no-deps -v .)
  export FUSEDOPT_CUDA=on FUSEDOPT_CUDA_ARCHS=90 MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16
  if [[ ${GPU_CHECK_BUILD:-run} == dry-run ]]; then
    echo "dry-run: FUSEDOPT_CUDA=$FUSEDOPT_CUDA FUSEDOPT_CUDA_ARCHS=$FUSEDOPT_CUDA_ARCHS ${cmd[*]}"
    return 0
  fi
  "${cmd[@]}" || return
  # Import from outside the checkout: the installed package, not python/fusedopt.
  (cd / && "$py" -c 'import fusedopt; print(fusedopt.build_info()); assert fusedopt.cuda_available(), "no CUDA kernels"')
}

cuda_ready() {  # a CUDA stage on a GPU with a CPU-only fusedopt would skip every test and pass
  "$py" -c 'import fusedopt, sys; sys.exit(0 if fusedopt.cuda_available() else "fusedopt has no usable CUDA kernels (build stage?)")'
}

per_test_timeout() {  # pytest-timeout where installed (the CUDA image has it): one hung test fails alone
  "$py" -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=$1"
}

# -v: the test ids that passed stay in the log even when the stage is killed. The files in
# alphabetical order, but tests/test_memory.py last: its 24 long-running cases (10 500 steps
# each) are the likeliest to meet the budget, and the kernels' correctness tests come first.
tests_stage() {
  local files=() f
  for f in tests/test_*.py; do [[ $f == tests/test_memory.py ]] || files+=("$f"); done
  cuda_ready && "$py" -m pytest -v -p no:cacheprovider -m cuda "${files[@]}" tests/test_memory.py --durations=5 \
    $(per_test_timeout 30)
}

large_stage() {  # the >2**31-element test is marked slow, so it is named explicitly (about 35 GB of GPU memory)
  cuda_ready && "$py" -m pytest -q -p no:cacheprovider --runslow -m cuda tests/test_large.py -k past_2_31 -rs
}

# Each kernel family once: SGD, Adam, LARS, LAMB (norms in the step), the tensor norms, Lanczos,
# and the master-weights (bf16 + fp32 master) path.
SANITIZER_TESTS="tests/test_determinism.py::test_cuda_bit_identical_run_to_run[SGD-momentum] \
tests/test_determinism.py::test_cuda_bit_identical_run_to_run[Adam] \
tests/test_trust_ratio_and_clipping.py::test_cuda_matches_reference[lars-dtype0] \
tests/test_trust_ratio_and_clipping.py::test_cuda_matches_reference[lamb-dtype0] \
tests/test_tensor_norms.py::test_cuda_matches_vector_norm_and_is_deterministic[dtype0] \
tests/test_hessian_lanczos.py::test_kernels_cuda_match_cpu \
tests/test_cuda_integration.py::test_master_weights_cuda_match_cpu[Adam] \
tests/test_quant8.py::test_cuda_matches_cpu_bit_for_bit[AdamW-amsgrad] \
tests/test_quant8.py::test_cuda_matches_cpu_bit_for_bit[LARS]"
# set -f: the node ids' [..] must reach pytest as they are, never as glob patterns.
memcheck_stage() { set -f; cuda_ready && SANITIZER_TOOLS=memcheck PYTHON=$py tools/run_compute_sanitizer.sh -q $SANITIZER_TESTS; }
racecheck_stage() { set -f; cuda_ready && SANITIZER_TOOLS=racecheck PYTHON=$py tools/run_compute_sanitizer.sh -q $SANITIZER_TESTS; }

bench_stage() { cuda_ready && "$py" benchmarks/bench_cuda.py --quick --out "$out/bench_cuda.json"; }

results_stage() {
  if [[ ! -f $out/bench_cuda.json ]]; then echo "no bench_cuda.json"; return 77; fi
  "$py" tools/write_results_md.py "$out/bench_cuda.json" --env "$out/env.json" --out "$out/RESULTS.md" &&
    cat "$out/RESULTS.md"
}

# SANITIZER_TESTS travels into the stage's bash -c through the environment.
export SANITIZER_TESTS
# Budgets (seconds): 15 + 175 + 75 + 30 + 50 + 50 + 60 + 10 = 465, under the 470 total; the clamp in
# budget_of keeps the sum inside the total whatever the overrides say, and TERM's 5 s grace
# (timeout -k) comes out of the later stages' share.
stage env 15 0 env_stage
stage build 175 0 build_stage  # not a GPU stage: dry-run on CPU, and a real build fails without nvcc
stage tests 75 1 tests_stage
stage large 30 1 large_stage
stage memcheck 50 1 memcheck_stage
stage racecheck 50 1 racecheck_stage
stage bench 60 1 bench_stage
stage results 10 0 results_stage
record total "$([[ $failures == 0 ]] && echo ok || echo "$failures stage(s) not ok")" $((SECONDS - start))
# The targets last on stdout: the device tool's reply carries the end of the output.
[[ -f $out/RESULTS.md ]] && sed -n '/^### Issue 17 targets/,$p' "$out/RESULTS.md"
((failures == 0))
