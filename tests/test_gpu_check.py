"""tools/gpu_check.sh and its parts, on a machine without a GPU (issue 17, part 1).

What only a GPU can show (the build for sm_90, the CUDA tests, compute-sanitizer, the numbers)
is not here; these tests make sure the one lent run is not wasted on the script itself: it
ends within its budgets, reports every stage, keeps OUTDIR under the device tool's 8 files,
and the RESULTS.md writer turns JSON into the table and the target lines.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STAGES = ["env", "build", "tests", "large", "memcheck", "racecheck", "bench", "results", "total"]
SAMPLE = ROOT / "tests" / "data" / "bench_cuda_sample.json"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run_check(out: Path, **env) -> subprocess.CompletedProcess:
    # The fusedopt the suite imports (installed, as in CI; PYTHONPATH passes through), never the
    # checkout's python/ folder, which has no compiled _C after a plain pip install.
    full = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUILD": "dry-run", **env}
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=full, capture_output=True, text=True, timeout=60)


def summary(out: Path) -> dict:
    lines = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split(None, 1)[1].rsplit(None, 1)[0].strip() for line in lines}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_end_to_end_without_gpu(tmp_path):
    t0 = time.monotonic()
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 40
    got = summary(tmp_path)
    assert list(got) == STAGES
    for name in ("tests", "large", "memcheck", "racecheck", "bench"):
        assert got[name] == "skipped: no GPU"
    assert got["env"] == got["build"] == got["total"] == "ok"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and sum(p.stat().st_size for p in files) < 1_000_000
    log = (tmp_path / "gpu_check.log").read_text()
    assert "dry-run: FUSEDOPT_CUDA=on FUSEDOPT_CUDA_ARCHS=90" in log and "--no-build-isolation" in log
    assert all(f"===== {s} =====" in log for s in STAGES[:-1])
    assert json.loads((tmp_path / "env.json").read_text())["commit"]


def test_stage_timeout_is_reported_and_the_rest_run(tmp_path):
    t0 = time.monotonic()
    proc = run_check(tmp_path, GPU_CHECK_SLEEP_TESTS="60", GPU_CHECK_BUDGET_TESTS="2", GPU_CHECK_SLEEP_BENCH="0")
    assert time.monotonic() - t0 < 40
    assert proc.returncode != 0
    got = summary(tmp_path)
    assert got["tests"] == "timed out (2s)"
    assert got["bench"] == "ok"  # the stages after the hung one still ran
    assert got["total"] == "1 stage(s) not ok"


def test_total_budget_clamps_every_stage(tmp_path):
    # Two hung stages with large budgets of their own: the 9 s total still bounds the run.
    t0 = time.monotonic()
    run_check(tmp_path, GPU_CHECK_TOTAL_S="9", GPU_CHECK_SLEEP_TESTS="100", GPU_CHECK_SLEEP_BENCH="100")
    assert time.monotonic() - t0 < 20
    got = summary(tmp_path)
    assert list(got) == STAGES
    assert got["tests"].startswith("timed out") and got["bench"].startswith("timed out")


def test_failed_stage_is_reported_with_its_exit_code(tmp_path):
    # Without nvcc's CUDA or pip's package the real build would take minutes; a python that does
    # not exist fails it at once, which is what this test needs.
    proc = run_check(tmp_path, GPU_CHECK_BUILD="run", PYTHON="/nonexistent/python")
    got = summary(tmp_path)
    assert got["build"].startswith("failed (exit ")
    assert list(got) == STAGES and proc.returncode != 0


def writer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "write_results_md.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=30)


def test_results_writer_table_and_targets(tmp_path):
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"gpu": "SAMPLE", "driver": "0.0", "torch": "0.0", "commit": "abc1234"}))
    proc = writer(SAMPLE, "--env", env, "--out", tmp_path / "RESULTS.md")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Device SAMPLE, driver 0.0, torch 0.0" in text and "commit abc1234" in text
    assert "| adam-fp32-500M | 3.75 | 93.3% | 1.50x vs torch fused (1.40-1.60) |" in text
    assert "| lamb-resnet50 | error: RuntimeError: sample failure |" in text
    assert "adam-fp32-500M: met (93.3%)" in text
    assert "sgd-momentum-fp32-500M: MISSED, 83.3% is 6.7 points short" in text
    assert "adam-10000x4096: MISSED, 1.60x is 1.25x short of 2x" in text
    # A row that is not in the JSON gets no number, only "not measured".
    assert "adam-bf16-master-500M: not measured" in text
    assert "lamb-resnet50: not measured (RuntimeError: sample failure)" in text


def test_bench_cuda_skips_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), "--quick", "--out", "none"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "skipped: no GPU", proc.stdout + proc.stderr


def test_bench_cuda_all_rows_on_cpu_at_small_size(monkeypatch, tmp_path):
    # Every row of the GPU run (bytes, percent of copy, speed-up, host time), on tiny CPU
    # tensors, then through the writer: the lent GPU run should only meet new numbers.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_cuda
    from fusedopt.benchmarking import workloads

    monkeypatch.setattr(bench_cuda, "BIG", 4096)
    monkeypatch.setattr(bench_cuda, "MANY", (10, 256))
    monkeypatch.setattr(workloads, "resnet50_shapes", lambda: [(64, 3), (64,)])
    monkeypatch.setattr(workloads, "bert_large_shapes", lambda: [(100, 10), (10,)])
    small_lanczos = bench_cuda.lanczos_rows
    monkeypatch.setattr(bench_cuda, "lanczos_rows", lambda *a: small_lanczos(*a, n=4096))
    saved = []
    rows = bench_cuda.run(dict(reps=3, warmup=1, target_s=0.002), torch.device("cpu"), 1 << 16,
                          on_row=lambda r: saved.append(len(r)))
    assert saved == list(range(2, len(rows) + 1))  # saved after every row
    assert [r for r in rows if "error" in r or "baseline_error" in r] == []
    by_name = {r["name"]: r for r in rows}
    adam = by_name["adam-fp32-500M"]
    assert adam["bytes_per_step"] == 4096 * 28 and adam["pct_copy_bw"] > 0 and adam["speedup"]["median"] > 0
    assert set(by_name["adam-10x256"]["host_s"]) == {"fusedopt", "torch fused"}
    assert {"lanczos-dots", "lanczos-orthogonalize", "lamb-bert-large"} <= set(by_name)
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows, "settings": {"mode": "test", "reps": 3}}))
    proc = writer(tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    assert "| lamb-bert-large |" in proc.stdout and "adam-fp32-500M: " in proc.stdout


def test_cuda_stages_fail_where_fusedopt_has_no_cuda_kernels(tmp_path):
    # A GPU with a CPU-only build (a failed build stage) must not pass with every test skipped.
    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA kernels")
    # Two of the CUDA stages run (each starts with the same check); the others sleep 0 s, for time.
    run_check(tmp_path, GPU_CHECK_ASSUME_GPU="1", GPU_CHECK_SLEEP_LARGE="0", GPU_CHECK_SLEEP_RACECHECK="0",
              GPU_CHECK_SLEEP_BENCH="0")
    got = summary(tmp_path)
    for name in ("tests", "memcheck"):
        assert got[name] == "failed (exit 1)", got
    assert "fusedopt has no usable CUDA kernels" in (tmp_path / "gpu_check.log").read_text()


def collected(*args) -> list:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_node_ids_the_gpu_stages_name_exist():
    text = SCRIPT.read_text()
    block = text.split('SANITIZER_TESTS="', 1)[1].split('"', 1)[0]
    ids = block.replace("\\\n", " ").split()
    families = ("SGD", "Adam", "lars", "lamb", "norm", "lanczos", "master")
    assert all(any(f in i for i in ids) for f in families), ids  # each kernel family once
    # One collection (each costs a torch import): the ids, and the CUDA tests of test_large.py,
    # of which the large stage's "-k past_2_31" must pick exactly one.
    got = collected("--runslow", "-m", "cuda", *ids, "tests/test_large.py")
    large = [i for i in got if i.startswith("tests/test_large.py") and "past_2_31" in i]
    assert large == ["tests/test_large.py::test_cuda_fp32_adam_past_2_31_elements"]
    assert sorted(set(got) - set(large)) == sorted(ids)


def test_only_the_named_stages_run_and_stale_results_go(tmp_path):
    (tmp_path / "bench_cuda.json").write_text(SAMPLE.read_text())  # left by an earlier run
    proc = run_check(tmp_path, GPU_CHECK_STAGES="build results")
    got = summary(tmp_path)
    assert got["build"] == "ok" and got["results"] == "skipped: no bench_cuda.json"
    assert all(got[s] == "not run (GPU_CHECK_STAGES)" for s in ("env", "tests", "bench")), got
    assert proc.returncode == 0 and not (tmp_path / "RESULTS.md").exists()
