"""Hessian eigenvalues: HVP counts of fusedopt.hessian.eigsh against power iteration with deflation
(PyHessian's method, written here), scipy's eigsh (ARPACK), and PyHessian and hessian-eigenthings
when installed; then the share of eigsh's time spent outside HVPs on a conv net.

    python benchmarks/bench_hessian.py [--quick | --full]

Counts: on two models, the MLP 20-32-32-10 of `fusedopt spectrum` (2058 params) trained 100 steps
with fusedopt.Adam, and a 5-layer tanh conv net of width 4 (2478 params, 64 random 32x32 images
with random labels) trained 100 steps the same way; tol = 1e-3 for every method with a stopping
rule; errors against each model's dense spectrum (torch.linalg.eigvalsh of its Hessian). hessian-eigenthings' Lanczos runs a
fixed number of steps: its count is the smallest of k + 1, k + 2, ..., 64, 128, ... steps within tol
of the exact values (a budget it could not choose without the answer). Each method also gets its
wall time (one run, so it is noisy on a busy machine; for hessian-eigenthings that last run) and the
ratios of HVPs and seconds to fusedopt eigsh's on the same task, next to the relative error that
was reached (every method is asked for the same tol 1e-3). "fusedopt eigsh, fixed HVPs" is eigsh
capped by max_matvecs under that same oracle (fewest HVPs within tol): the two then compare at
equal accuracy, and its difference to plain eigsh is what certifying the result costs.

    python benchmarks/bench_hessian.py --only-counts     # that table alone

Overhead: eigsh(k=5) on a 5-layer tanh conv net, capped at a fixed number of HVPs so the run is
short. Not converging within the cap is intended there; what is measured is the time outside the
HVPs (the Lanczos vector work and the driver) over repeated runs.

HVP methods: HessianOperator(method="double_backward") against method="forward_over_reverse" on
a 4-layer BatchNorm ReLU CNN (batch 64 of 3x32x32, fp32, CPU), in eval and train mode. Memory is
the peak of the tensor storage allocated by torch's CPU allocator during one HVP, above what was
live before it: the allocation and free events of torch.profiler(profile_memory=True), summed in
time order (parameters, data and the operator's own state are outside it; Python objects and the
autograd graph's bookkeeping other than tensors are not counted). It is deterministic for a model
and a batch; on this CNN it agreed with the process's RSS high-water mark to 0.2 MiB (a separate
check, with glibc's mmap threshold fixed so that freed tensors leave the RSS). Time: wall seconds
per HVP, the two methods interleaved, with the gradient alone (one backward) for scale.

Block products: trace(op, num_probes, method="hutchinson") with block_size=1 (a loop of
matvecs) against block_size=8 and 16 (op.matmat: HessianOperator's batched double backward,
GGNOperator's batched backward passes, EmpiricalFisherOperator's per-sample gradients shared by
the block, the forward-over-reverse Hessian's vmap over tangents), on the MLP above (Hessian
both ways, GGN, Fisher) and the BatchNorm CNN (eval mode, Hessian both ways), at 1 and 2
threads, all in one run, interleaved.
The speed-up is the loop's time over the block's, repetition by repetition.

    python benchmarks/bench_hessian.py --only-blocks     # that section alone
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import List, Optional

import numpy as np
import torch

from fusedopt.benchmarking import cli, environment, report
from fusedopt.benchmarking.compare import Unavailable
from fusedopt.benchmarking.peers import eigenthings_top, import_peer, pyhessian_top
from fusedopt.benchmarking.progress import Progress
from fusedopt.benchmarking.timing import Summary
from fusedopt.benchmarking.timing import measure_interleaved, ratios
from fusedopt.benchmarking.workloads import bn_conv_net, tanh_conv_net, trained_mlp, trained_tanh_cnn
from fusedopt.hessian import EmpiricalFisherOperator, GGNOperator, HessianOperator, eigsh, trace

TOL = 1e-3
METHOD_NOTES = {"power + deflation": "PyHessian's method, written here",
                "hessian-eigenthings": "fixed steps: fewest k+1, k+2, ... within tol (picked knowing the answer; "
                                        "time of that run alone)",
                "fusedopt eigsh, fixed HVPs": "eigsh capped at the fewest HVPs within tol (the same oracle as "
                                              "hessian-eigenthings'; no convergence test; that run alone)"}
TASKS = [("top-1", 1, "LA"), ("top-5", 5, "LA"), ("most negative", 1, "SA")]
# The models of the count table: name -> () -> (model, X, y); each gets its dense spectrum.
COUNT_MODELS = {"MLP": trained_mlp, "tanh CNN": trained_tanh_cnn}
COUNT_STEPS = 2 * len(COUNT_MODELS) + len(COUNT_MODELS) * len(TASKS)  # the count table's progress updates
# Conv net per mode: (width, batch, HVP cap, repetitions).
OVERHEAD = {"quick": (16, 8, 20, 3), "default": (24, 16, 30, 3), "full": (96, 32, 40, 3)}
# BatchNorm CNN of the HVP-method comparison per mode: (width, batch, repetitions).
HVP_METHODS = {"quick": (8, 16, 3), "default": (16, 64, 5), "full": (32, 64, 7)}
METHODS = ("double_backward", "forward_over_reverse")
# Block products per mode: (probes, CNN width, CNN batch, Fisher batch, repetitions).
BLOCKS = {"quick": (16, 4, 16, 128, 3), "default": (16, 8, 32, 256, 5), "full": (32, 8, 64, 512, 7)}
BLOCK_SIZES = (8, 16)
BLOCK_OPERATORS = 6  # rows of block_rows per thread count (the progress bar's total)
THREADS = (1, 2)


def power_deflation(op, k, tol, max_iter=1000, seed=0):
    """Power iteration per eigenvalue, deflating the ones found; stops when the Rayleigh quotient
    changes by at most tol (relative). Returns (ascending values, HVPs)."""
    g = torch.Generator().manual_seed(seed)
    found, vecs, hvps = [], [], 0
    for _ in range(k):
        v = torch.randn(op.shape[0], generator=g, dtype=op.dtype)
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v -= (u @ v) * u
            v /= v.norm()
            hv = op.matvec(v)
            hvps += 1
            new = float(v @ hv)
            for u, value in zip(vecs, found):
                hv -= value * (u @ v) * u
            done = lam is not None and abs(new - lam) <= tol * abs(new) + 1e-12
            lam, v = new, hv / hv.norm()
            if done:
                break
        found.append(lam)
        vecs.append(v / v.norm())
    return sorted(found), hvps


def scipy_eigsh(op, k, which, tol):
    sparse_linalg = import_peer("scipy.sparse.linalg", "scipy")
    count = [0]

    def mv(x):
        count[0] += 1
        return op.matvec(torch.from_numpy(np.asarray(x, dtype=np.float32).ravel())).numpy().astype(np.float64)

    linear = sparse_linalg.LinearOperator(op.shape, matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])  # ARPACK's own start is random: fix it
    values = sparse_linalg.eigsh(linear, k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return sorted(values.tolist()), count[0]


def eigenthings_within_tol(model, loss_fn, X, y, k, exact):
    """hessian-eigenthings with the fewest Lanczos steps (k + 1, k + 2, ... 64, then doubling) whose
    values are within TOL of ``exact``: (values, HVPs, seconds of that run alone)."""
    steps = k + 1
    while steps <= 512:
        t0 = time.perf_counter()
        values, hvps = eigenthings_top(model, loss_fn, X, y, k, steps)
        seconds = time.perf_counter() - t0
        if relative_error(values, exact) <= TOL:
            return values, hvps, seconds
        steps = steps + 1 if steps < 64 else 2 * steps
    raise Unavailable(f"not within tol={TOL} after 512 Lanczos steps")


def eigsh_within_tol(op, k, which, exact):
    """fusedopt eigsh capped at the fewest HVPs (max_matvecs = k, k + 1, ...) whose values are
    within TOL of ``exact``: the protocol of eigenthings_within_tol, so the two compare at equal
    accuracy. The difference to plain eigsh's count is the price of certifying the result (the
    residual test) without knowing the answer."""
    for cap in range(k, 513):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # not converged under the cap: expected
            r = eigsh(op, k=k, which=which, tol=TOL, max_matvecs=cap, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        if relative_error(r.eigenvalues.tolist(), exact) <= TOL:
            return r.eigenvalues.tolist(), r.num_matvecs, seconds
    raise Unavailable(f"not within tol={TOL} after 512 HVPs")


def relative_error(values, exact) -> float:
    ref = torch.as_tensor(sorted(exact), dtype=torch.float64)
    got = torch.as_tensor(sorted(values), dtype=torch.float64)
    return float(((got - ref).abs() / ref.abs()).max())


def dense_spectrum(model, loss_fn, X, y) -> torch.Tensor:
    """Exact eigenvalues (ascending) of the loss Hessian, from the dense matrix. torch.func builds
    it vectorized, several times faster than one HVP per column; in chunks of 256 columns, which
    keeps its memory near 0.6 GB instead of 2 GB at the same speed."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
        return loss_fn(torch.func.functional_call(model, params, (X,)), y)

    hessian = torch.func.jacrev(torch.func.jacrev(loss_of), chunk_size=256)(flat)
    return torch.linalg.eigvalsh(hessian.double())


def count_rows(bar) -> List[dict]:
    """The count table on every model of COUNT_MODELS, one row per (model, task, method)."""
    rows = []
    for name, build in COUNT_MODELS.items():
        model, X, y = build()
        bar.update(f"trained the {name}")
        rows += _count_rows_of(name, model, X, y, bar)
    return rows


def _count_rows_of(model_name, model, X, y, bar) -> List[dict]:
    loss_fn = torch.nn.functional.cross_entropy
    op = HessianOperator(model, loss_fn, (X, y))
    exact = dense_spectrum(model, loss_fn, X, y)
    bar.update("dense Hessian")
    rows = []
    for task, k, which in TASKS:
        ref = (exact[-k:] if which == "LA" else exact[:k]).tolist()

        def fusedopt_eigsh():
            r = eigsh(op, k=k, which=which, tol=TOL, generator=torch.Generator().manual_seed(0))
            return r.eigenvalues.tolist(), r.num_matvecs

        methods = {"fusedopt eigsh": fusedopt_eigsh,
                   "fusedopt eigsh, fixed HVPs": lambda: eigsh_within_tol(op, k, which, ref),
                   "scipy eigsh (ARPACK)": lambda: scipy_eigsh(op, k, which, TOL)}
        if which == "LA":
            methods["power + deflation"] = lambda: power_deflation(op, k, TOL)
            methods["pyhessian"] = lambda: pyhessian_top(model, loss_fn, X, y, k, TOL)
            methods["hessian-eigenthings"] = lambda: eigenthings_within_tol(model, loss_fn, X, y, k, ref)
        for method, run in methods.items():
            row = dict(model=model_name, task=task, method=method, note=METHOD_NOTES.get(method, ""))
            try:
                t0 = time.perf_counter()
                out = run()
                seconds = time.perf_counter() - t0
                values, hvps = out[:2]
                if len(out) == 3:  # oracle budgets: the final run of the budget search alone
                    seconds = out[2]
                row.update(status="ok", hvps=hvps, seconds=seconds, max_relative_error=relative_error(values, ref))
            except Unavailable as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:
                row.update(status="error" if method == "fusedopt eigsh" else "skipped",
                           reason=f"{type(exc).__name__}: {exc}")
            rows.append(row)
        base = next((r for r in rows if r["task"] == task and r["method"] == "fusedopt eigsh" and r["status"] == "ok"), None)
        for r in rows:
            if r["task"] == task and r["status"] == "ok" and base is not None:
                r["hvps_vs_eigsh"] = r["hvps"] / base["hvps"]
                r["seconds_vs_eigsh"] = r["seconds"] / base["seconds"]
        bar.update(task)
    return rows


class TimedOperator:
    """Forwards matvec and adds up the seconds spent in it."""

    def __init__(self, op):
        self.op, self.shape, self.dtype, self.device, self.seconds = op, op.shape, op.dtype, op.device, 0.0

    def matvec(self, x):
        t = time.perf_counter()
        y = self.op.matvec(x)
        self.seconds += time.perf_counter() - t
        return y


def capped_eigsh(op, cap):
    """eigsh stopped at ``cap`` HVPs on purpose. Its "did not converge" warning is the expected
    outcome here, so it is recorded as such instead of printed; any other warning passes through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = eigsh(op, k=5, tol=TOL, max_matvecs=cap, generator=torch.Generator().manual_seed(0))
    for w in caught:
        if "converge" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def overhead_row(mode, reps, bar) -> dict:
    width, batch, cap, _ = OVERHEAD[mode]
    model, X, y = tanh_conv_net(width, batch)
    totals, inside, converged, hvps = [], [], 0, 0
    for _ in range(reps):
        op = TimedOperator(HessianOperator(model, torch.nn.functional.cross_entropy, (X, y)))
        t = time.perf_counter()
        result = capped_eigsh(op, cap)
        totals.append(time.perf_counter() - t)
        inside.append(op.seconds)
        converged, hvps = int(result.converged.sum()), result.num_matvecs
        bar.update("conv net")
    outside = Summary.of([(t - h) / t for t, h in zip(totals, inside)])
    return dict(model=f"5-layer tanh conv net, width {width}, {op.shape[0]:,} params, batch {batch}x3x32x32",
                hvps=hvps, hvp_cap=cap, converged=f"{converged}/5",
                seconds=Summary.of(totals).as_dict(), fraction_outside_hvps=outside.as_dict(), _outside=outside,
                _total=Summary.of(totals))


def peak_allocated_bytes(fn) -> Optional[int]:
    """Peak bytes of tensor storage live during ``fn()`` above the level at its start, from the
    CPU allocator's events under torch.profiler (profile_memory=True). None where this torch's
    profiler does not expose its raw events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    live = peak = 0
    for event in sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def method_rows(mode, reps, bar) -> dict:
    """Peak memory and seconds of one HVP by each method, in eval and train mode."""
    width, batch, _ = HVP_METHODS[mode]
    model, X, y = bn_conv_net(width, batch)
    loss_fn = torch.nn.functional.cross_entropy
    rows = []
    for module_mode in ("eval", "train"):
        ops = {m: HessianOperator(model, loss_fn, (X, y), mode=module_mode, method=m) for m in METHODS}
        v = torch.randn(ops[METHODS[0]].shape[0], generator=torch.Generator().manual_seed(0))
        hv = {m: op.matvec(v) for m, op in ops.items()}  # also the warm-up
        difference = float((hv[METHODS[1]] - hv[METHODS[0]]).abs().max() / hv[METHODS[0]].abs().max())
        params = list(model.parameters())

        def gradient():
            model.train(module_mode == "train")
            torch.autograd.grad(loss_fn(model(X), y), params)

        fns = {"gradient only": gradient, **{m: (lambda op=op: op.matvec(v)) for m, op in ops.items()}}
        peaks = {name: peak_allocated_bytes(fn) for name, fn in fns.items()}
        saved = {k: b.clone() for k, b in model.named_buffers()}
        timed = measure_interleaved(fns, reps=reps, warmup=0, device=torch.device("cpu"), iters=1,
                                    after_rep=lambda _: bar.update(f"HVP methods ({module_mode})"))
        with torch.no_grad():  # the gradient's train-mode passes moved the running stats
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        model.eval()
        base = timed[METHODS[0]].summary
        for name in fns:
            summary = timed[name].summary
            row = dict(mode=module_mode, method=name, status="ok" if summary else "error",
                       peak_bytes=peaks[name], peak_vs_double_backward=(
                           peaks[name] / peaks[METHODS[0]] if peaks[name] and peaks[METHODS[0]] else None))
            if summary is None:
                row["reason"] = timed[name].error
            else:
                row.update(seconds=summary.as_dict(), _summary=summary,
                           _speedup=ratios(base, summary) if base else None)
            if name == METHODS[1]:
                row["max_relative_difference"] = difference
            rows.append(row)
    return dict(model=f"4-layer BatchNorm ReLU CNN, width {width}, {ops[METHODS[0]].shape[0]:,} params, "
                      f"batch {batch}x3x32x32, fp32", rows=rows)


def print_method_rows(result, reps) -> None:
    print(f"\nHVP methods on the {result['model']}: peak tensor memory allocated during one HVP "
          f"(profiler allocation events) and wall time, median of {reps} interleaved repetitions")
    table = []
    for r in result["rows"]:
        mib = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "n/a"
        mem = f"{r['peak_vs_double_backward']:.2f}x" if r["peak_vs_double_backward"] is not None else "n/a"
        summary, speedup = r.pop("_summary", None), r.pop("_speedup", None)
        if summary is None:
            table.append([r["mode"], r["method"], mib, mem, "", "", "", r["status"], r.get("reason", "")[:60]])
            continue
        note = f"Hv differs by {r['max_relative_difference']:.1e} (rel.)" if "max_relative_difference" in r else ""
        table.append([r["mode"], r["method"], mib, mem, report.median_cell(summary, "s"), report.spread_cell(summary, "s"),
                      report.ratio_cell(speedup), report.noisy_cell(summary), note])
    print(report.format_table(["mode", "method", "peak MiB", "memory vs double_backward (lower is better)",
                               "s/HVP median", "spread min-max (%)", report.speedup_header("double_backward"),
                               "flag", "note"], table))


def block_rows(mode, reps, bar) -> dict:
    """Seconds of trace() by a loop of matvecs (block_size=1) and by blocks of 8 and 16, per
    operator and thread count; the thread counts are restored afterwards."""
    import fusedopt

    probes, width, batch, fisher_batch, _ = BLOCKS[mode]
    mlp, X, y = trained_mlp()
    cnn, Xc, yc = bn_conv_net(width, batch)
    loss_fn = torch.nn.functional.cross_entropy
    ops = {f"Hessian, MLP 20-32-32-10 (2058 params, batch {len(X)})": HessianOperator(mlp, loss_fn, (X, y)),
           f"GGN, MLP 20-32-32-10 (batch {len(X)})": GGNOperator(mlp, loss_fn, (X, y)),
           f"Fisher, MLP 20-32-32-10 (batch {fisher_batch})":
               EmpiricalFisherOperator(mlp, loss_fn, (X[:fisher_batch], y[:fisher_batch])),
           f"Hessian, BatchNorm CNN width {width} ({sum(p.numel() for p in cnn.parameters()):,} params, "
           f"batch {batch}x3x32x32, eval)": HessianOperator(cnn, loss_fn, (Xc, yc)),
           "Hessian forward-over-reverse, MLP": HessianOperator(mlp, loss_fn, (X, y), method="forward_over_reverse"),
           "Hessian forward-over-reverse, CNN eval": HessianOperator(cnn, loss_fn, (Xc, yc),
                                                                     method="forward_over_reverse")}
    before = (torch.get_num_threads(), fusedopt.get_num_threads())
    rows = []
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            fusedopt.set_num_threads(threads)
            for name, op in ops.items():
                fns = {f"block {b}": (lambda b=b: trace(op, probes, seed=0, block_size=b)) for b in (1,) + BLOCK_SIZES}
                estimates = {k: fn().estimate for k, fn in fns.items()}  # also the warm-up
                timed = measure_interleaved(fns, reps=reps, warmup=0, device=torch.device("cpu"), iters=1,
                                            after_rep=lambda _: bar.update(f"blocks ({threads} thr)"))
                base = timed["block 1"].summary
                for key in fns:
                    summary = timed[key].summary
                    row = dict(operator=name, threads=threads, block_size=int(key.split()[1]),
                               status="ok" if summary else "error",
                               relative_difference=abs(estimates[key] - estimates["block 1"]) /
                               max(abs(estimates["block 1"]), 1e-300))
                    if summary is None:
                        row["reason"] = timed[key].error
                    else:
                        row.update(seconds_per_probe=Summary.of([t / probes for t in summary.samples]).as_dict(),
                                   _summary=summary, _speedup=ratios(base, summary) if base else None)
                        if row["_speedup"] is not None:
                            row["speedup_vs_loop"] = row["_speedup"].as_dict()
                    rows.append(row)
    finally:
        torch.set_num_threads(before[0])
        fusedopt.set_num_threads(before[1])
    return dict(probes=probes, rows=rows)


def print_block_rows(result, reps) -> None:
    print(f"\nBlock products: trace(op, {result['probes']} probes) by a loop of matvecs (block 1) and by "
          f"op.matmat blocks, median of {reps} interleaved repetitions")
    table = []
    for r in result["rows"]:
        summary, speedup = r.pop("_summary", None), r.pop("_speedup", None)
        if summary is None:
            table.append([r["operator"], str(r["threads"]), str(r["block_size"]), "", "", "", r["status"],
                          r.get("reason", "")[:60]])
            continue
        per_probe = Summary.of([t / result["probes"] for t in summary.samples])
        table.append([r["operator"], str(r["threads"]), str(r["block_size"]), report.median_cell(per_probe, "s"),
                      report.spread_cell(summary, "s"), report.ratio_cell(speedup) if r["block_size"] > 1 else "",
                      report.noisy_cell(summary), f"{r['relative_difference']:.0e}" if r["block_size"] > 1 else ""])
    print(report.format_table(["operator", "threads", "block", "s/probe median", "trace s spread min-max (%)",
                               report.speedup_header("block 1"), "flag", "estimate rel. diff"], table))


def print_count_rows(counts, env) -> None:
    if environment.busy_warning(env):
        print(environment.busy_warning(env))
    print("HVP counts are deterministic for the seed; errors are relative to the dense spectrum")
    table = [[r["model"], r["task"], r["method"], str(r.get("hvps", "")),
              f"{r['hvps_vs_eigsh']:.2f}x" if "hvps_vs_eigsh" in r else "",
              f"{r['seconds']:.3f}" if "seconds" in r else "",
              f"{r['seconds_vs_eigsh']:.2f}x" if "seconds_vs_eigsh" in r else "",
              f"{r['max_relative_error']:.1e}" if "max_relative_error" in r else "",
              r["status"] if r["status"] != "ok" else "", (r.get("reason") or r["note"])[:80]] for r in counts]
    print(report.format_table(["model", "task", "method", "HVPs (fewer is better)", "HVPs vs eigsh", "wall s (one run)",
                               "time vs eigsh", "max rel. error", "status", "note"], table))


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.benchmark_parser("bench_hessian.py", __doc__, devices=("cpu",), calls=False)
    ap.add_argument("--only-blocks", action="store_true", help="run only the block-products section")
    ap.add_argument("--only-counts", action="store_true", help="run only the HVP-count table")
    args = cli.parse(ap, argv)
    cli.apply_threads(args.threads)
    env = environment.capture(torch.device("cpu"))
    block_reps = cli.pick(args.reps, args.mode, {mode: sizes[4] for mode, sizes in BLOCKS.items()})
    if args.only_blocks:
        with Progress(len(THREADS) * BLOCK_OPERATORS * block_reps, "hessian blocks", enabled=not args.no_progress) as bar:
            blocks = block_rows(args.mode, block_reps, bar)
        print(f"\nHessian block products ({args.mode}) on {environment.headline(env)}")
        if environment.busy_warning(env):
            print(environment.busy_warning(env))
        print_block_rows(blocks, block_reps)
        report.save(report.results_payload("hessian_blocks", env, dict(mode=args.mode, reps=block_reps), [],
                                           blocks=blocks), name="hessian_blocks", device="cpu", out=args.out)
        return 1 if any(r["status"] == "error" for r in blocks["rows"]) else 0
    if args.only_counts:
        with Progress(COUNT_STEPS, "hessian counts", enabled=not args.no_progress) as bar:
            counts = count_rows(bar)
        print(f"\nHessian eigenvalues ({args.mode}) on {environment.headline(env)}")
        print_count_rows(counts, env)
        report.save(report.results_payload("hessian_counts", env, dict(mode=args.mode, tol=TOL), counts),
                    name="hessian_counts", device="cpu", out=args.out)
        return 1 if any(r["status"] == "error" for r in counts) else 0
    reps = cli.pick(args.reps, args.mode, {mode: sizes[3] for mode, sizes in OVERHEAD.items()})
    method_reps = cli.pick(args.reps, args.mode, {mode: sizes[2] for mode, sizes in HVP_METHODS.items()})
    with Progress(COUNT_STEPS + reps + 2 * method_reps + len(THREADS) * BLOCK_OPERATORS * block_reps, "hessian",
                  enabled=not args.no_progress) as bar:
        counts = count_rows(bar)
        overhead = overhead_row(args.mode, reps, bar)
        methods = method_rows(args.mode, method_reps, bar)
        blocks = block_rows(args.mode, block_reps, bar)
    print(f"\nHessian eigenvalues ({args.mode}) on {environment.headline(env)}")
    print_count_rows(counts, env)
    outside, total = overhead.pop("_outside"), overhead.pop("_total")
    print(f"\n{overhead['model']}: eigsh(k=5) capped at {overhead['hvp_cap']} HVPs by design "
          f"({overhead['converged']} converged, as intended for a short run)")
    print(report.format_table(["runs", "s/run median", "spread min-max (%)", "time outside HVPs", "flag"],
                              [[str(reps), report.median_cell(total, "s"), report.spread_cell(total, "s"),
                                f"{100 * outside.median:.2f}% ({100 * outside.low:.2f}-{100 * outside.high:.2f})",
                                report.noisy_cell(total)]]))
    print_method_rows(methods, method_reps)
    print_block_rows(blocks, block_reps)
    width, batch, cap, _ = OVERHEAD[args.mode]
    m_width, m_batch, _ = HVP_METHODS[args.mode]
    settings = dict(mode=args.mode, tol=TOL, overhead=dict(width=width, batch=batch, hvp_cap=cap, reps=reps),
                    hvp_methods=dict(width=m_width, batch=m_batch, reps=method_reps),
                    blocks=dict(zip(("probes", "cnn_width", "cnn_batch", "fisher_batch"), BLOCKS[args.mode][:4]),
                                reps=block_reps, block_sizes=BLOCK_SIZES, threads=THREADS))
    report.save(report.results_payload("hessian", env, settings, counts, overhead=overhead, hvp_methods=methods,
                                       blocks=blocks),
                name="hessian", device="cpu", out=args.out)
    return 1 if any(r["status"] == "error" for r in counts + methods["rows"] + blocks["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
