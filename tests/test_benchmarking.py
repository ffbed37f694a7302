"""The shared benchmarking module's behaviour: spread and the noisy flag, interleaving, errors versus
skips, result files that never replace anything, the environment record, the large-batch floor
and the capped Lanczos run of the Hessian benchmark."""
from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fusedopt.benchmarking import environment, report
from fusedopt.benchmarking.compare import ERROR, OK, SKIPPED, Candidate, Unavailable, run_candidates, timing_cells
from fusedopt.benchmarking.progress import Progress
from fusedopt.benchmarking.timing import NOISY_SPREAD, Measured, Summary, measure_interleaved, ratios

CPU = torch.device("cpu")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=bench@test", "-c", "user.name=bench", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "reference.json").write_text("{}\n")
    git(tmp_path, "add", "reference.json")
    git(tmp_path, "commit", "-q", "-m", "reference results")
    return tmp_path


# ---- spread and noise ----------------------------------------------------------------------------
def test_summary_median_spread_and_noisy_flag():
    s = Summary.of([1.0, 1.1, 1.05])
    assert s.median == 1.05 and s.low == 1.0 and s.high == 1.1
    assert s.spread == pytest.approx(0.1 / 1.05) and not s.noisy
    assert Summary.of([1.0, 1.0, 1.0 + NOISY_SPREAD + 1e-6]).noisy
    assert not Summary.of([1.0, 1.0, 1.0 + NOISY_SPREAD - 1e-6]).noisy
    d = Summary.of([2.0, 4.0, 3.0]).as_dict()
    assert d["median"] == 3.0 and d["min"] == 2.0 and d["max"] == 4.0 and d["noisy"] and d["samples"] == [2, 4, 3]


def test_speedups_are_per_repetition_baseline_over_row():
    base, row = Summary.of([2.0, 4.0, 6.0]), Summary.of([1.0, 4.0, 2.0])
    assert ratios(base, row).samples == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        ratios(base, Summary.of([1.0]))


def test_table_cells_show_spread_and_flag():
    row_time = Summary.of([0.010, 0.011, 0.015])
    assert report.spread_cell(row_time, "ms") == "10-15 (45%)"
    assert report.noisy_cell(row_time) == "noisy"
    assert report.speedup_header("torch-fused") == "speed-up vs torch-fused, higher is better"


# ---- interleaving and failures ---------------------------------------------------------------------
def test_repetitions_are_interleaved_in_alternating_order():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    measured = measure_interleaved(fns, reps=3, iters=1, warmup=0, device=CPU)
    assert order == list("abc") + list("cba") + list("abc")
    assert all(len(m.samples) == 3 and m.error is None for m in measured.values())


def test_calls_per_repetition_are_calibrated_from_the_warmup():
    counts = {"fast": 0}

    def fast():
        counts["fast"] += 1

    measured = measure_interleaved({"fast": fast}, reps=3, warmup=1, device=CPU, target_s=0.01)
    assert measured["fast"].calls_per_rep > 1
    assert counts["fast"] == 1 + 3 * measured["fast"].calls_per_rep


def test_a_callable_that_raises_is_reported_and_the_others_go_on():
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")

    measured = measure_interleaved({"flaky": flaky, "fine": lambda: None}, reps=4, iters=1, warmup=1, device=CPU)
    assert measured["flaky"].error == "RuntimeError: boom" and measured["flaky"].summary is None
    assert len(measured["fine"].samples) == 4


def test_run_candidates_separates_errors_from_skips():
    def unavailable():
        raise Unavailable("peer not installed")

    def broken():
        raise ValueError("bad")

    rows, _ = run_candidates([
        Candidate("baseline", lambda: (lambda: None)),
        Candidate("ours", lambda: (lambda: None), must_work=True),
        Candidate("ours-broken", broken, must_work=True),
        Candidate("peer-missing", unavailable),
        Candidate("peer-broken", broken),
    ], baseline="baseline", device=CPU, reps=3, iters=1, warmup=0)
    status = {r.name: r.status for r in rows}
    assert status == {"baseline": OK, "ours": OK, "ours-broken": ERROR, "peer-missing": SKIPPED,
                      "peer-broken": SKIPPED}
    by_name = {r.name: r for r in rows}
    assert by_name["ours"].speedup is not None and by_name["ours"].as_dict()["status"] == OK
    assert timing_cells(by_name["ours-broken"], "ms")[0] == "ERROR"
    assert timing_cells(by_name["peer-missing"], "ms")[0] == "skipped"


# ---- result files ---------------------------------------------------------------------------------
def test_new_results_path_never_names_an_existing_file(tmp_path):
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first = report.new_results_path("optim", "cpu", tmp_path, now)
    first.write_text("{}")
    second = report.new_results_path("optim", "cpu", tmp_path, now)
    assert second != first and not second.exists() and "20260102-030405" in second.name


def test_write_results_makes_a_new_file_each_run(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "default_results_dir", lambda: tmp_path)
    paths = [report.write_results({"run": i}, name="optim", device="cpu", out=None) for i in range(3)]
    assert len(set(paths)) == 3
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
    assert report.write_results({}, name="optim", device="cpu", out="none") is None


def test_a_tracked_file_is_never_overwritten(repo):
    tracked, untracked = repo / "reference.json", repo / "mine.json"
    untracked.write_text("old")
    assert report.is_tracked(tracked) and not report.is_tracked(untracked)
    assert "tracks" in report.check_out_path(str(tracked))
    assert report.check_out_path(str(untracked)) is None
    with pytest.raises(FileExistsError):
        report.write_results({"x": 1}, name="optim", device="cpu", out=str(tracked))
    assert tracked.read_text() == "{}\n"
    report.write_results({"x": 1}, name="optim", device="cpu", out=str(untracked))  # the user's own file
    assert json.loads(untracked.read_text()) == {"x": 1}
    tracked.unlink()  # deleted from the working tree, still tracked: writing it would bring it back changed
    assert "tracks" in report.check_out_path(str(tracked))


def test_several_devices_get_one_file_each(tmp_path):
    out = tmp_path / "run.json"
    a = report.write_results({}, name="optim", device="cpu", out=str(out), devices_in_run=2)
    b = report.write_results({}, name="optim", device="cuda", out=str(out), devices_in_run=2)
    assert a.name == "run_cpu.json" and b.name == "run_cuda.json"


# ---- environment ----------------------------------------------------------------------------------
def test_environment_names_device_versions_commit_and_date():
    env = environment.capture(CPU)
    for key in ("device", "device_name", "cpu_model", "cpu_cores", "torch", "fusedopt", "build_info", "commit",
                "date"):
        assert env[key] not in (None, ""), key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    json.dumps(env)  # it goes into the results file as it is


def test_a_busy_machine_is_said_above_the_table():
    env = {"usable_cores": 2, "load_average_1min": 5.5}
    assert "load average 5.5 on 2 cores" in environment.busy_warning(env)
    assert environment.busy_warning({"usable_cores": 2, "load_average_1min": 1.0}) is None
    assert environment.busy_warning({"usable_cores": 2, "load_average_1min": None}) is None


def test_git_commit_is_short_and_marks_a_dirty_tree(repo, tmp_path_factory):
    clean = environment.git_commit(repo)
    assert len(clean) >= 7 and "+" not in clean
    (repo / "untracked-result.json").write_text("{}")  # new result files do not make the tree dirty
    assert environment.git_commit(repo) == clean
    (repo / "reference.json").write_text('{"changed": true}\n')
    assert environment.git_commit(repo) == clean + "+dirty"
    plain = tmp_path_factory.mktemp("plain")
    if subprocess.run(["git", "rev-parse"], cwd=plain, capture_output=True).returncode != 0:
        assert environment.git_commit(plain) == "unknown"


def test_results_payload_schema():
    payload = report.results_payload("optim", {"device": "cpu", "torch": "x", "commit": "abc"}, {"reps": 3}, [])
    assert {"benchmark", "schema", "environment", "settings", "definitions", "rows"} <= set(payload)
    assert "noisy" in payload["definitions"] and "speedup" in payload["definitions"]


# ---- progress -------------------------------------------------------------------------------------
def test_progress_without_tqdm_prints_plain_lines(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with Progress(2, "bench", log_interval_s=0.0) as bar:
        bar.update("first")
        bar.update("second")
    err = capsys.readouterr().err
    assert "1/2 first" in err and "2/2 second" in err


# ---- the large-batch floor and the capped Lanczos run ---------------------------------------------
def test_floor_uses_the_best_stream_of_the_same_repetition():
    large_batch = load_script("bench_large_batch")
    n = 1000
    # Repetition 1: copy is the fastest stream; repetition 2: multiply-add (8 B/elem in 1 s vs 16 B in 1 s).
    probes = {"stream copy": Measured([8e-6, 1e-6]), "stream add": Measured([1.2e-5, 1.2e-5]),
              "stream multiply-add": Measured([1.6e-5, 1e-6])}
    fused = Summary.of([28e-6, 28e-6])
    rates = large_batch.stream_rates(probes, n)
    assert rates["copy"].samples == pytest.approx((1e9, 8e9))
    best, fraction = large_batch.floor_fraction(fused, rates, 28, n)
    assert best.samples == pytest.approx((1e9, 16e9))
    assert fraction.samples == pytest.approx((1.0, 1 / 16))


def test_capped_lanczos_run_does_not_warn(recwarn):
    hessian = load_script("bench_hessian")
    from fusedopt.hessian import MatrixOperator

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 200, generator=g, dtype=torch.float64)
    result = hessian.capped_eigsh(MatrixOperator(a + a.T), cap=10)
    assert not bool(result.converged.all())  # the cap bites: this is the case that used to warn
    assert not [w for w in recwarn if "converge" in str(w.message)]


def test_eigsh_within_tol_is_the_fewest_hvps_that_reach_it(seed, recwarn):
    hessian = load_script("bench_hessian")
    from fusedopt.hessian import MatrixOperator, eigsh

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(1.0, 50.0, 120, dtype=torch.float64) ** 2 / 50  # decaying gaps at the top
    op = MatrixOperator(q @ torch.diag(spectrum) @ q.T)
    k, exact = 3, spectrum[-3:].tolist()
    values, hvps, _ = hessian.eigsh_within_tol(op, k, "LA", exact)
    assert hessian.relative_error(values, exact) <= hessian.TOL
    with pytest.warns(RuntimeWarning, match="converge"):  # one fewer is not converged either
        r = eigsh(op, k=k, which="LA", tol=hessian.TOL, max_matvecs=hvps - 1,
                  generator=torch.Generator().manual_seed(0))
    assert hessian.relative_error(r.eigenvalues.tolist(), exact) > hessian.TOL  # one fewer does not reach it
    certified = eigsh(op, k=k, which="LA", tol=hessian.TOL, generator=torch.Generator().manual_seed(0))
    assert hvps <= certified.num_matvecs
    assert not [w for w in recwarn if "converge" in str(w.message)]  # the search's capped runs are silent


def test_peak_allocated_bytes_counts_tensors_freed_inside():
    hessian = load_script("bench_hessian")
    kept = torch.empty(4 << 20, dtype=torch.uint8)  # live before: not counted

    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 3 MiB live together
        del a, b
        torch.empty(1 << 20, dtype=torch.uint8)

    peak = hessian.peak_allocated_bytes(fn)
    assert peak is not None and 3 << 20 <= peak < (3 << 20) + (64 << 10)
    del kept


def test_hvp_method_rows_at_a_tiny_size(monkeypatch, capsys):
    hessian = load_script("bench_hessian")
    monkeypatch.setitem(hessian.HVP_METHODS, "quick", (2, 4, 3))

    class Bar:
        def update(self, _):
            pass

    result = hessian.method_rows("quick", 3, Bar())
    rows = result["rows"]
    assert [(r["mode"], r["method"]) for r in rows] == [
        (m, name) for m in ("eval", "train") for name in ("gradient only",) + hessian.METHODS]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in rows)
    for r in rows:
        if r["method"] == "double_backward":
            assert r["peak_vs_double_backward"] == 1.0
        if r["method"] == "forward_over_reverse":
            assert r["max_relative_difference"] < 1e-4  # fp32: the same vector to rounding
    hessian.print_method_rows(result, 3)
    out = capsys.readouterr().out
    assert "forward_over_reverse" in out and "speed-up vs double_backward" in out


def test_block_rows_at_a_tiny_size(monkeypatch, capsys):
    """The block-products section: every operator, thread count and block size, estimates equal
    to fp32 rounding, thread counts restored."""
    import fusedopt

    hessian = load_script("bench_hessian")
    monkeypatch.setitem(hessian.BLOCKS, "quick", (4, 2, 4, 16, 2))
    monkeypatch.setattr(hessian, "trained_mlp", _tiny_mlp)
    before = (torch.get_num_threads(), fusedopt.get_num_threads())

    class Bar:
        def update(self, _):
            pass

    result = hessian.block_rows("quick", 2, Bar())
    assert (torch.get_num_threads(), fusedopt.get_num_threads()) == before
    rows = result["rows"]
    assert [(r["threads"], r["block_size"]) for r in rows] == [
        (t, b) for t in hessian.THREADS for _ in range(hessian.BLOCK_OPERATORS) for b in (1,) + hessian.BLOCK_SIZES]
    assert all(r["status"] == "ok" and r["relative_difference"] < 1e-4 for r in rows)
    hessian.print_block_rows(result, 2)
    assert "speed-up vs block 1" in capsys.readouterr().out


def _tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    return model, torch.randn(32, 20), torch.randint(0, 10, (32,))


# ---- peers ------------------------------------------------------------------------------------------
def test_a_missing_peer_is_unavailable_with_its_install_command():
    from fusedopt.benchmarking.peers import OptimizerPeer, import_peer

    with pytest.raises(Unavailable, match=r"not installed \(pip install no-such-peer\)"):
        import_peer("fusedopt_no_such_peer_module", "no-such-peer")
    peer = OptimizerPeer("ghost", "fusedopt_no_such_peer_module", "no-such-peer", "", lambda *a: None)
    assert "pip install no-such-peer" in peer.missing()


def test_bench_names_a_missing_peer_once_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    import fusedopt.bench as bench
    from fusedopt.benchmarking.peers import OptimizerPeer

    ghost = OptimizerPeer("ghost", "fusedopt_no_such_peer_module", "no-such-peer", "", lambda *a: None)
    monkeypatch.setitem(bench.OPTIMIZER_PEERS, "ghost", ghost)
    out = tmp_path / "r.json"
    rc = bench.main(["--device", "cpu", "--workloads", "tiny", "--optimizers", "sgd", "--reps", "3", "--iters", "1",
                     "--no-progress", "--impls", "torch-fused", "fusedopt", "ghost", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and text.count("peer ghost skipped") == 1
    assert {r["impl"] for r in json.loads(out.read_text())["rows"]} == {"torch-fused", "fusedopt"}


def test_quality_rows_ratios_skips_and_targets(monkeypatch, capsys):
    """bench_low_memory --quality at a tiny size: each row's ratios are the per-seed ratios of
    its final losses; a missing peer is skipped with its reason; the targets follow the rows."""
    import fusedopt
    from fusedopt.benchmarking import training_tasks

    low = load_script("bench_low_memory")
    monkeypatch.setattr(training_tasks, "TASKS", {"cnn": (training_tasks.cnn_task, 30)})

    def ghost(ps):
        raise Unavailable("ghost not installed (pip install ghost)")
    monkeypatch.setattr(low, "QUALITY_IMPLS", {
        "fusedopt fp32": lambda ps: fusedopt.AdamW(ps, lr=3e-3),
        "fusedopt int8": lambda ps: fusedopt.AdamW(ps, lr=3e-3, state_dtype=torch.int8),
        "bitsandbytes AdamW8bit": ghost})
    with Progress(2, "quality", enabled=False) as bar:
        rows = low.quality_rows(2, bar)
    by = {r["impl"]: r for r in rows}
    assert by["bitsandbytes AdamW8bit"]["status"] == "skipped" and "pip install ghost" in by[
        "bitsandbytes AdamW8bit"]["note"]
    fp32, int8 = by["fusedopt fp32"]["final_losses"], by["fusedopt int8"]["final_losses"]
    assert len(fp32) == 2 and fp32 != int8
    ratios = [a / b - 1 for a, b in zip(int8, fp32)]
    vs = by["fusedopt int8"]["vs fusedopt fp32"]
    assert vs["mean"] == pytest.approx(sum(ratios) / 2, rel=1e-12)
    assert vs["standard_error"] == pytest.approx(abs(ratios[0] - ratios[1]) / 2, rel=1e-9)
    assert by["fusedopt fp32"]["vs fusedopt fp32"]["mean"] == 0.0
    assert "vs bitsandbytes AdamW8bit" not in by["fusedopt int8"]
    targets = low.quality_targets(rows)
    assert [t["target"] for t in targets] == ["8-bit final loss within 3% of fp32"]
    assert targets[0]["met"] == (abs(vs["mean"]) <= 0.03)
    low.print_quality(rows, targets)
    assert "ghost not installed" in capsys.readouterr().out
