"""`fusedopt bench`: the command line, its table and JSON, and that a failing fusedopt row fails the
run. Smoke runs on tiny shapes, not timings."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import fusedopt
import fusedopt.bench as bench
from fusedopt.__main__ import main
from fusedopt.benchmarking import workloads

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["bench", "--device", "cpu", "--workloads", "tiny", "--reps", "3", "--iters", "1", "--warmup", "0",
            "--no-progress"]


def test_workload_shapes_are_the_real_models():
    assert len(workloads.resnet50_shapes()) == 161
    assert workloads.numel(workloads.resnet50_shapes()) == 25_557_032
    assert len(workloads.gpt2_small_shapes()) == 148
    assert workloads.numel(workloads.gpt2_small_shapes()) == 124_439_808
    assert len(workloads.bert_base_shapes()) == 199
    assert workloads.numel(workloads.bert_base_shapes()) == 109_482_240
    assert workloads.numel(workloads.many_tensors_shapes()) == 5_000_000
    assert workloads.numel(workloads.host_overhead_shapes()) == 64_000


def run_tiny(tmp_path, capsys, *extra):
    out = tmp_path / "r.json"
    rc = main([*TINY_RUN, "--impls", "torch-foreach", "torch-fused", "fusedopt", "--out", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, json.loads(out.read_text())


def test_tiny_run_writes_a_table_and_json_without_errors(tmp_path, capsys):
    rc, text, _, data = run_tiny(tmp_path, capsys)
    assert rc == 0
    assert "speed-up vs torch-fused, higher is better" in text and "spread min-max" in text
    assert "ERROR" not in text
    env = data["environment"]
    for key in ("device", "device_name", "torch", "commit", "fusedopt", "build_info", "date", "cpu_model"):
        assert env[key] not in (None, "")
    assert data["benchmark"] == "optim" and data["schema"] == 1
    rows = data["rows"]
    assert {(r["optimizer"], r["impl"]) for r in rows} == {
        (o, i) for o in bench.OPTIMIZERS for i in ("torch-foreach", "torch-fused", "fusedopt")}
    ours = [r for r in rows if r["impl"] == "fusedopt"]
    assert all(r["status"] == "ok" for r in ours), [r.get("reason") for r in ours]
    for r in rows:
        if r["status"] == "ok":
            t = r["seconds_per_call"]
            assert 0 < t["min"] <= t["median"] <= t["max"] and len(t["samples"]) == 3
            assert r["effective_gb_per_s"] > 0 and r["speedup"]["median"] > 0


def test_a_fusedopt_row_that_raises_fails_the_run(tmp_path, capsys, monkeypatch):
    def broken_step(self, closure=None):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(fusedopt.Adam, "step", broken_step)
    rc, text, err, data = run_tiny(tmp_path, capsys)
    assert rc == 1
    assert "ERROR" in text and "injected failure" in err
    failed = [r for r in data["rows"] if r["status"] == "error"]
    # AdamW may share Adam's step(); torch's rows must be untouched either way.
    assert ("adam", "fusedopt") in {(r["optimizer"], r["impl"]) for r in failed}
    assert all(r["impl"] == "fusedopt" and "injected failure" in r["reason"] for r in failed)
    assert all(r["status"] == "ok" for r in data["rows"] if r["impl"] != "fusedopt")


def test_a_row_that_raises_mid_run_is_an_error_too(tmp_path, capsys, monkeypatch):
    real_step, calls = fusedopt.SGD.step, [0]

    def fails_on_third_call(self, closure=None):
        calls[0] += 1
        if calls[0] >= 3:  # after the state-creating step and the warm-up call
            raise RuntimeError("late failure")
        return real_step(self, closure)

    monkeypatch.setattr(fusedopt.SGD, "step", fails_on_third_call)
    rc, _, _, data = run_tiny(tmp_path, capsys, "--warmup", "1")
    assert rc == 1
    assert [(r["optimizer"], r["impl"]) for r in data["rows"] if r["status"] == "error"] == [("sgd", "fusedopt")]


@pytest.mark.parametrize("argv, option", [
    (["--reps", "0"], "--reps"), (["--reps", "-3"], "--reps"), (["--reps", "2"], "--reps"),
    (["--iters", "0"], "--iters"), (["--warmup", "-1"], "--warmup"), (["--threads", "0"], "--threads"),
    (["--reps", "x"], "--reps"),
])
def test_bad_counts_are_one_argparse_error_line(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0], err


def test_out_never_overwrites_a_tracked_file(capsys):
    tracked = REPO / "benchmarks" / "results" / "host_overhead.json"
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", str(tracked)], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout with the committed reference results")
    before = tracked.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main([*TINY_RUN, "--out", str(tracked)])
    assert exc.value.code == 2
    assert "tracks" in capsys.readouterr().err
    assert tracked.read_bytes() == before


def test_default_modes_stay_small():
    """The default run is the one a new user starts: it must not grow back into the full suite
    (GPT-2 small's 124M params are what made it take minutes and 7 GB)."""
    preset = bench.OPTIMIZER_STEP
    assert "gpt2-small" not in preset.workloads["default"] and "gpt2-small" in preset.workloads["full"]
    assert "torch-forloop" not in preset.impls["default"]
    assert {"torch-foreach", "torch-fused", "fusedopt"} <= set(preset.impls["default"])


def load_host_overhead_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_host_overhead", REPO / "benchmarks" / "bench_host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_overhead_run_checks_the_targets(tmp_path, capsys, monkeypatch):
    """bench_host_overhead.py on tiny shapes: every row and target line is there, in the table and the JSON."""
    script = load_host_overhead_script()
    pairs = script.SMALL + script.NORM_SCALED
    monkeypatch.setitem(script.CASES["cpu"], "quick", [("tiny", pairs)])
    monkeypatch.setattr(script, "TARGETS", [("tiny", w, a, b, bound, kind) for _, w, a, b, bound, kind in
                                            script.TARGETS[:5]])
    out = tmp_path / "h.json"
    rc = script.main(["--quick", "--device", "cpu", "--reps", "3", "--iters", "1", "--warmup", "0", "--no-progress",
                      "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "ERROR" not in text and "us/tensor" in text
    data = json.loads(out.read_text())
    assert data["benchmark"] == "host_overhead"
    assert {r["impl"] for r in data["rows"]} == {f"{i} {o}" for i, o in pairs}
    assert all(r["status"] == "ok" for r in data["rows"]), [r.get("reason") for r in data["rows"]]
    assert [t["target"] for t in data["targets"]] == [t[1] for t in script.TARGETS[:5]]
    assert all(t["ratio"] > 0 and isinstance(t["met"], bool) for t in data["targets"])
    for t in data["targets"]:
        assert t["target"] in text


def test_muon_run_writes_rows_and_matmul_rates(tmp_path, capsys, monkeypatch):
    """bench_muon.py on two tiny matrices: the rows (the peer's ok or skipped naming it), their FLOP
    rates and the probes' rates."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_muon", REPO / "benchmarks" / "bench_muon.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setitem(script.WORKLOADS, "transformer-20", [(16, 24), (24, 16)])
    out = tmp_path / "m.json"
    rc = script.main(["--quick", "--device", "cpu", "--reps", "3", "--iters", "1", "--warmup", "0", "--no-progress",
                      "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "ERROR" not in text and "NS GFLOP/s" in text
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if "impl" in r]
    assert {r["impl"] for r in timed} == {"torch.optim.Muon", "fusedopt bf16", "fusedopt fp32", script.PEER}
    ours = [r for r in timed if r["impl"] != script.PEER]  # the peer runs where installed, else is skipped
    assert all(r["status"] == "ok" and r["ns_gflop_per_s"] > 0 for r in ours), ours
    peer = next(r for r in timed if r["impl"] == script.PEER)
    assert peer["status"] == "ok" or "pytorch-optimizer" in str(peer), peer
    assert script.ns_flops([(16, 24)], 1) == 2 * 16 * 16 * 24 * 2 + 2 * 16 ** 3
    rates = [r["matmul_gflop_per_s"] for r in rows if "matmul_gflop_per_s" in r][0]
    assert set(rates) == {"fp32 bmm", "bf16 bmm"} and min(rates.values()) > 0
