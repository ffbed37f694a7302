"""The benchmark runner and the `fusedopt` command line (a smoke test on tiny shapes, not a timing)."""
from __future__ import annotations

import json

import fusedopt.bench as bench
from fusedopt.__main__ import main


def test_workload_shapes_are_the_real_models():
    assert len(bench.resnet50_shapes()) == 161
    assert bench.numel(bench.resnet50_shapes()) == 25_557_032
    assert bench.numel(bench.gpt2_small_shapes()) == 124_439_808
    assert bench.numel(bench.many_small_shapes()) == 5_000_000


def test_cli_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--device", "cpu", "--workloads", "tiny", "--reps", "2", "--iters", "1", "--warmup", "0",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fusedopt" in text and "vs torch fused" in text
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("device_name", "torch_version", "git_commit", "torch_threads", "fusedopt_threads"):
        assert key in env
    rows = data["results"]
    assert {r["impl"] for r in rows} == set(bench.IMPLS)
    assert {r["optimizer"] for r in rows} == {"adam", "adamw", "sgd"}
    for r in rows:
        if "error" not in r:
            assert r["seconds_per_step"] > 0 and r["effective_gb_per_s"] > 0


def test_progress_fallback_without_tqdm(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name == "tqdm":
            raise ImportError
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    p = bench.Progress(2)
    p.update("a")
    p.update("b")
    p.close()
    err = capsys.readouterr().err
    assert "1/2 a" in err and "2/2 b" in err
