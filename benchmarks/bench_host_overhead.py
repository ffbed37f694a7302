"""Host cost of optimizer.step(): many small tensors, where the arithmetic is negligible and what
is timed is the per-step host work (Python, per-tensor checks, pointer gathering, dispatch).

    python benchmarks/bench_host_overhead.py [--quick | --full] [--device cpu|cuda|all]

CPU: 10 000 params of 64 elements (Adam, AdamW and SGD with momentum against torch's fused
implementations; LARS and LAMB against fusedopt's AdamW on the same params) and 5000 params of
1000 elements (Adam); --full adds torch's foreach rows and the ResNet-50 and GPT-2 small shapes
(Adam), which sit at the memory wall. CUDA, when available: 10 000 params of 4096 elements (Adam
against torch fused), timed with CUDA events around back-to-back calls, so that host and GPU work
count as a training loop sees them.

All rows of a workload run interleaved, repetition by repetition (median and min-max spread per
row). The targets of issue 12 are checked at the end against the medians of the per-repetition
ratios; the JSON (benchmarks/results/, with the commit) keeps every row and the target lines.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fusedopt
from fusedopt.benchmarking import cli, environment, report
from fusedopt.benchmarking.compare import (Candidate, Row, any_errors, error_summary, note_cell, run_candidates,
                                           target_line, timing_cells, timing_header)
from fusedopt.benchmarking.progress import Progress
from fusedopt.benchmarking.workloads import OPTIMIZER_WORKLOADS, random_params_and_grads

HYPER = {"adam": dict(lr=1e-3), "adamw": dict(lr=1e-3, weight_decay=1e-2), "sgd": dict(lr=1e-2, momentum=0.9),
         "lars": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),  # adapts: norms and update
         "lamb": dict(lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0)}  # adapts and clips: three passes
FUSEDOPT = {"adam": fusedopt.Adam, "adamw": fusedopt.AdamW, "sgd": fusedopt.SGD, "lars": fusedopt.LARS,
            "lamb": fusedopt.LAMB}
TORCH = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
TORCH_MODES = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True)}
BASELINE = "torch-fused adam"

# (workload, [(impl, optimizer)]) per device and mode.
SMALL = [(impl, opt) for opt in ("adam", "adamw", "sgd") for impl in ("torch-fused", "fusedopt")]
SMALL_FULL = SMALL + [("torch-foreach", opt) for opt in ("adam", "adamw", "sgd")]
NORM_SCALED = [("fusedopt", "lars"), ("fusedopt", "lamb")]
ADAM_PAIR = [("torch-fused", "adam"), ("fusedopt", "adam")]
CASES = {
    "cpu": {"quick": [("10000x64", SMALL + NORM_SCALED)],
            "default": [("10000x64", SMALL + NORM_SCALED), ("5000x1000", ADAM_PAIR)],
            "full": [("10000x64", SMALL_FULL + NORM_SCALED), ("5000x1000", ADAM_PAIR), ("resnet50", ADAM_PAIR),
                     ("gpt2-small", ADAM_PAIR)]},
    "cuda": {mode: [("10000x4096", ADAM_PAIR)] for mode in ("quick", "default", "full")},
}
# Issue 12's targets: (workload, what, numerator row, denominator row, bound, "min" or "max").
TARGETS = [
    ("10000x64", "Adam vs torch fused", "torch-fused adam", "fusedopt adam", 10.0, "min"),
    ("10000x64", "AdamW vs torch fused", "torch-fused adamw", "fusedopt adamw", 10.0, "min"),
    ("10000x64", "SGD vs torch fused", "torch-fused sgd", "fusedopt sgd", 5.0, "min"),
    ("10000x64", "LARS time / fusedopt AdamW time", "fusedopt lars", "fusedopt adamw", 1.5, "max"),
    ("10000x64", "LAMB time / fusedopt AdamW time", "fusedopt lamb", "fusedopt adamw", 1.5, "max"),
    ("5000x1000", "Adam vs torch fused", "torch-fused adam", "fusedopt adam", 5.0, "min"),
    ("10000x4096", "CUDA Adam vs torch fused", "torch-fused adam", "fusedopt adam", 2.0, "min"),
]


def candidate(impl: str, opt: str, base: List[torch.Tensor], grads: List[torch.Tensor]) -> Candidate:
    def setup() -> Callable[[], object]:
        params = [b.clone() for b in base]
        for p, g in zip(params, grads):
            p.grad = g
        if impl == "fusedopt":
            optimizer = FUSEDOPT[opt](params, **HYPER[opt])
        else:
            optimizer = TORCH[opt](params, **HYPER[opt], **TORCH_MODES[impl])
        optimizer.step()  # creates the state outside the timed region
        return optimizer.step
    return Candidate(f"{impl} {opt}", setup, must_work=impl == "fusedopt")


def bench_workload(workload: str, pairs, device: torch.device, args, after_rep) -> Dict[str, Row]:
    shapes = OPTIMIZER_WORKLOADS[workload]()
    base, grads = random_params_and_grads(shapes, device)
    baseline = BASELINE if ("torch-fused", "adam") in pairs else f"{pairs[0][0]} {pairs[0][1]}"
    rows, _ = run_candidates([candidate(impl, opt, base, grads) for impl, opt in pairs], baseline=baseline,
                             device=device, reps=args.reps, iters=args.iters, warmup=args.warmup,
                             target_s=args.seconds_per_rep, after_rep=after_rep)
    return {row.name: row for row in rows}


def target_lines(device: str, results: Dict[str, Dict[str, Row]]) -> List[dict]:
    out = []
    for workload, what, num, den, bound, kind in TARGETS:
        line = target_line(results.get(workload, {}), what, num, den, bound, kind)
        if line is not None:
            out.append(dict(device=device, workload=workload, **line))
    return out


def parse_args(argv: Optional[Sequence[str]]):
    ap = cli.benchmark_parser("bench_host_overhead.py", __doc__)
    args = cli.parse(ap, argv)
    args.devices = cli.resolve_devices(ap, args.device)
    args.reps = cli.pick(args.reps, args.mode, {"quick": 3, "default": 7, "full": 9})
    args.warmup = 1 if args.warmup is None else args.warmup
    args.seconds_per_rep = {"quick": 0.1, "default": 0.3, "full": 0.5}[args.mode]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cli.apply_threads(args.threads)
    failed = False
    for device in args.devices:
        env = environment.capture(device)  # before timing: the commit is the code that runs
        cases = CASES[device.type][args.mode]
        results: Dict[str, Dict[str, Row]] = {}
        with Progress(len(cases) * args.reps, f"host overhead {device.type}", enabled=not args.no_progress) as bar:
            for workload, pairs in cases:
                results[workload] = bench_workload(workload, pairs, device, args, lambda i: bar.update(workload))
        table, records = [], []
        for workload, rows in results.items():
            tensors = len(OPTIMIZER_WORKLOADS[workload]())
            for row in rows.values():
                per_tensor = f"{row.time.median / tensors * 1e6:.3f}" if row.time is not None else ""
                table.append([workload, row.name, *timing_cells(row, "us"), per_tensor, note_cell(row)])
                records.append(dict(workload=workload, tensors=tensors, **row.as_dict()))
        report.print_title(f"bench_host_overhead.py ({args.mode})", env, args.reps)
        print(report.format_table(["workload", "impl", *timing_header("us", "torch fused adam"), "us/tensor",
                                   "note"], table))
        targets = target_lines(device.type, results)
        print("\nIssue 12 targets (median of per-repetition ratios):")
        for t in targets:
            print(f"  {t['workload']:>10}  {t['target']:<34} {t['ratio']:6.2f}  (target {t['bound']})  "
                  f"{'met' if t['met'] else 'MISSED'}")
        all_rows = [r for rows in results.values() for r in rows.values()]
        for line in error_summary(all_rows):
            print(line, file=sys.stderr)
        settings = dict(mode=args.mode, reps=args.reps, warmup=args.warmup, iters=args.iters,
                        seconds_per_rep=args.seconds_per_rep, hyperparameters=HYPER, baseline=BASELINE)
        report.save(report.results_payload("host_overhead", env, settings, records, targets=targets),
                    name="host_overhead", device=device.type, out=args.out, devices_in_run=len(args.devices))
        failed = failed or any_errors(all_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
