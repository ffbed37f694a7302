"""Optimizer step benchmark: fusedopt's Adam, AdamW and SGD against torch.optim's foreach and fused
implementations (and its for-loop with --full), and against bitsandbytes and torchao when installed.

Run as `fusedopt bench` (`python -m fusedopt bench`, `python benchmarks/bench_optim.py`): about
a minute on 2 CPU cores by default (ResNet-50 and 5000 x 1000 parameter shapes); --full adds
GPT-2 small and the for-loop (several minutes); --quick is a smoke-size run (ResNet-50 only).

Each implementation gets its own params and state; the grads are shared (they are only read).
The implementations run interleaved, repetition by repetition, and each row shows its median
time per step with the min-max spread ("noisy" above 20%) and its speed-up vs torch fused
(torch fused's time over the row's time, per repetition; higher is better). Effective bandwidth
counts the bytes an fp32 step must move: Adam/AdamW 28 B per param (read p, g, m, v; write p, m,
v), SGD with momentum 20 B (read p, g, buf; write p, buf).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .benchmarking import cli, environment, report
from .benchmarking.compare import (Candidate, Row, any_errors, error_summary, note_cell, run_candidates,
                                   timing_cells, timing_header)
from .benchmarking.peers import OPTIMIZER_PEERS
from .benchmarking.progress import Progress
from .benchmarking.workloads import OPTIMIZER_WORKLOADS, numel, random_params_and_grads

OPTIMIZERS = ("adam", "adamw", "sgd")
HYPERPARAMETERS = {"adam": dict(lr=1e-3, weight_decay=0.0), "adamw": dict(lr=1e-3, weight_decay=1e-2),
                   "sgd": dict(lr=1e-2, momentum=0.9)}
BYTES_PER_PARAM = {"adam": 28, "adamw": 28, "sgd": 20}
TORCH_MODES = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
               "torch-fused": dict(fused=True)}
BASELINE = "torch-fused"
IMPLS = tuple(TORCH_MODES) + ("fusedopt",)


@dataclass(frozen=True)
class Preset:
    """What one optimizer-step benchmark compares, per mode (quick / default / full)."""

    name: str  # names the JSON files
    prog: str
    description: str
    workloads: Dict[str, Tuple[str, ...]]
    impls: Dict[str, Tuple[str, ...]]
    reps: Dict[str, int] = field(default_factory=lambda: {"quick": 3, "default": 5, "full": 7})
    seconds_per_rep: Dict[str, float] = field(default_factory=lambda: {"quick": 0.05, "default": 0.2, "full": 0.5})
    devices: Tuple[str, ...] = ("cpu", "cuda", "all")
    unit: str = "ms"
    bandwidth_column: bool = True  # effective GB/s; meaningless where host work dominates


OPTIMIZER_STEP = Preset(
    name="optim", prog="fusedopt bench", description=__doc__,
    workloads={"quick": ("resnet50",), "default": ("resnet50", "5000x1000"),
               "full": ("resnet50", "gpt2-small", "5000x1000")},
    impls={"quick": ("torch-foreach", "torch-fused", "fusedopt"),
           "default": ("torch-foreach", "torch-fused", "fusedopt", *OPTIMIZER_PEERS),
           "full": (*IMPLS, *OPTIMIZER_PEERS)},
)


def optimizer_candidate(impl: str, opt: str, base: List[torch.Tensor], grads: List[torch.Tensor]) -> Candidate:
    import fusedopt

    hp = HYPERPARAMETERS[opt]

    def build(params):
        if impl == "fusedopt":
            return {"adam": fusedopt.Adam, "adamw": fusedopt.AdamW, "sgd": fusedopt.SGD}[opt](params, **hp)
        if impl in TORCH_MODES:
            cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]
            return cls(params, **hp, **TORCH_MODES[impl])
        return OPTIMIZER_PEERS[impl].make(opt, params, hp)

    def setup():
        params = [b.clone() for b in base]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = build(params)
        optimizer.step()  # creates the state outside the timed region
        return optimizer.step

    note = OPTIMIZER_PEERS[impl].note if impl in OPTIMIZER_PEERS else ""
    return Candidate(impl, setup, must_work=impl == "fusedopt", note=note)


def bench_workload(workload: str, opt: str, impls: Sequence[str], device: torch.device, args, after_rep
                   ) -> List[Tuple[Row, dict]]:
    shapes = OPTIMIZER_WORKLOADS[workload]()
    n = numel(shapes)
    base, grads = random_params_and_grads(shapes, device)
    candidates = [optimizer_candidate(impl, opt, base, grads) for impl in impls]
    rows, _ = run_candidates(candidates, baseline=BASELINE, device=device, reps=args.reps, iters=args.iters,
                             warmup=args.warmup, target_s=args.seconds_per_rep, after_rep=after_rep)
    out = []
    for row in rows:
        d = dict(workload=workload, optimizer=opt, tensors=len(shapes), params=n, **row.as_dict())
        if row.time is not None:
            d["effective_gb_per_s"] = BYTES_PER_PARAM[opt] * n / row.time.median / 1e9
        out.append((row, d))
    return out


def parse_args(argv: Optional[Sequence[str]], preset: Preset):
    ap = cli.benchmark_parser(preset.prog, preset.description, devices=preset.devices)
    ap.add_argument("--workloads", nargs="+", choices=list(OPTIMIZER_WORKLOADS), default=None,
                    help="parameter-shape sets (default: the mode's)")
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--impls", nargs="+", choices=[*IMPLS, *OPTIMIZER_PEERS], default=None,
                    help="implementations (default: the mode's; peers run only when installed)")
    args = cli.parse(ap, argv)
    args.devices = cli.resolve_devices(ap, args.device)
    args.workloads = args.workloads or list(preset.workloads[args.mode])
    args.reps = cli.pick(args.reps, args.mode, preset.reps)
    args.warmup = 1 if args.warmup is None else args.warmup  # the setup step already ran once
    args.seconds_per_rep = preset.seconds_per_rep[args.mode]
    return args


def chosen_impls(args, preset: Preset) -> Tuple[List[str], List[str]]:
    """(implementations to run, lines about peers that are not installed). A missing peer is said
    once, not as a skipped row in every case."""
    wanted = list(args.impls or preset.impls[args.mode])
    notes = []
    for name in [i for i in wanted if i in OPTIMIZER_PEERS]:
        problem = OPTIMIZER_PEERS[name].missing()
        if problem:
            wanted.remove(name)
            notes.append(f"peer {name} skipped: {problem}")
    return wanted, notes


def main(argv: Optional[Sequence[str]] = None, preset: Preset = OPTIMIZER_STEP) -> int:
    args = parse_args(argv, preset)
    cli.apply_threads(args.threads)
    impls, peer_notes = chosen_impls(args, preset)
    failed = False
    for device in args.devices:
        env = environment.capture(device)  # before timing: the commit is the code that runs
        cases = [(w, o) for w in args.workloads for o in args.optimizers]
        table, records, rows = [], [], []
        with Progress(len(cases) * args.reps, f"{preset.prog} {device.type}", enabled=not args.no_progress) as bar:
            for w, o in cases:
                for row, record in bench_workload(w, o, impls, device, args, lambda i: bar.update(f"{w} {o}")):
                    gbs = [f"{record['effective_gb_per_s']:.1f}" if "effective_gb_per_s" in record else ""]
                    table.append([w, o, row.name, *timing_cells(row, preset.unit),
                                  *(gbs if preset.bandwidth_column else []), note_cell(row)])
                    records.append(record)
                    rows.append(row)
        report.print_title(f"{preset.prog} ({args.mode})", env, args.reps)
        for line in peer_notes:
            print(line)
        header = ["workload", "opt", "impl", *timing_header(preset.unit, BASELINE),
                  *(["GB/s"] if preset.bandwidth_column else []), "note"]
        print(report.format_table(header, table))
        for line in error_summary(rows):
            print(line, file=sys.stderr)
        settings = dict(mode=args.mode, reps=args.reps, warmup=args.warmup, iters=args.iters,
                        seconds_per_rep=args.seconds_per_rep, impls=impls, baseline=BASELINE,
                        hyperparameters=HYPERPARAMETERS, bytes_per_param=BYTES_PER_PARAM, peers_skipped=peer_notes)
        report.save(report.results_payload(preset.name, env, settings, records), name=preset.name,
                    device=device.type, out=args.out, devices_in_run=len(args.devices))
        failed = failed or any_errors(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
