"""Muon's step(): fusedopt.Muon (ns_dtype bf16, the default, and fp32) against torch.optim.Muon,
side by side, with the Newton-Schulz FLOP rate of each row and the machine's measured matmul rates.

    python benchmarks/bench_muon.py [--quick | --full] [--device cpu|cuda|all]

Workloads: 20 matrices of transformer shapes (256x768, 768x256, 256x256, 256x1024, 1024x256, four
of each; 3.9M params, 23.4 GFLOP of Newton-Schulz per step at 5 steps), and with --full GPT-2
small's 48 hidden matrices. The FLOP count is the iteration's matmuls (2 m n k each: X X^T, G G,
G X per step on the wide orientation); the matmul rates are one (4, 256, 1024) x (4, 1024, 256)
batched matmul in fp32 and in bf16, timed in the same repetitions. pytorch-optimizer's Muon (the
`bench` extra) runs beside them when installed, and is skipped with the reason otherwise.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import fusedopt
from fusedopt.benchmarking import cli, environment, report
from fusedopt.benchmarking.compare import (Candidate, any_errors, error_summary, note_cell, run_candidates,
                                           timing_cells, timing_header)
from fusedopt.benchmarking.peers import import_peer
from fusedopt.benchmarking.progress import Progress

Shape = Tuple[int, int]
TRANSFORMER: List[Shape] = [(256, 768), (768, 256), (256, 256), (256, 1024), (1024, 256)] * 4
GPT2_HIDDEN: List[Shape] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
WORKLOADS = {"transformer-20": TRANSFORMER, "gpt2-small-hidden": GPT2_HIDDEN}
NS_STEPS = 5
BASELINE = "torch.optim.Muon"
PEER = "pytorch-optimizer Muon"  # the other Muon on the package registry that runs on CPU (the bench extra)


def ns_flops(shapes: Sequence[Shape], steps: int = NS_STEPS) -> float:
    total = 0.0
    for a, b in shapes:
        s, l = min(a, b), max(a, b)
        total += steps * (2 * s * s * l + 2 * s * s * s + 2 * s * s * l)
    return total


def candidate(name: str, shapes: Sequence[Shape], device: torch.device) -> Candidate:
    def setup() -> Callable[[], object]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
        if name == BASELINE:
            opt = torch.optim.Muon(params, lr=0.02)
        elif name == PEER:
            # pytorch-optimizer's Muon (batched over same-shape matrices with foreach): torch's
            # hyperparameters where the two share them (weight decay 0.1, momentum 0.95, nesterov,
            # 5 steps of the same quintic coefficients); its Newton-Schulz runs in bf16.
            peer = import_peer("pytorch_optimizer", "pytorch-optimizer")
            opt = peer.Muon([dict(params=params, use_muon=True)], lr=0.02, weight_decay=0.1, momentum=0.95,
                            nesterov=True, ns_steps=5)
        else:
            opt = fusedopt.Muon(params, lr=0.02, ns_dtype=torch.float32 if name.endswith("fp32") else torch.bfloat16)
        opt.step()
        return opt.step
    return Candidate(name, setup, must_work=name not in (BASELINE, PEER))


def matmul_probe(dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    x = torch.randn(4, 256, 1024, device=device).to(dtype)
    out = torch.empty(4, 256, 256, dtype=dtype, device=device)
    return lambda: torch.bmm(x, x.mT, out=out)


MATMUL_FLOPS = 2 * 4 * 256 * 256 * 1024


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = cli.benchmark_parser("bench_muon.py", __doc__)
    args = cli.parse(ap, argv)
    devices = cli.resolve_devices(ap, args.device)
    cli.apply_threads(args.threads)
    reps = cli.pick(args.reps, args.mode, {"quick": 3, "default": 5, "full": 7})
    warmup = 1 if args.warmup is None else args.warmup
    seconds = {"quick": 0.5, "default": 1.0, "full": 2.0}[args.mode]
    workloads = ["transformer-20"] + (["gpt2-small-hidden"] if args.mode == "full" else [])
    names = [BASELINE, "fusedopt bf16", "fusedopt fp32", PEER]
    failed = False
    for device in devices:
        env = environment.capture(device)
        table, records, rows_all = [], [], []
        with Progress(len(workloads) * reps, f"bench_muon {device.type}", enabled=not args.no_progress) as bar:
            for w in workloads:
                shapes = WORKLOADS[w]
                flops = ns_flops(shapes)
                probes = {"fp32 bmm": matmul_probe(torch.float32, device),
                          "bf16 bmm": matmul_probe(torch.bfloat16, device)}
                rows, measured = run_candidates([candidate(n, shapes, device) for n in names], baseline=BASELINE,
                                                device=device, reps=reps, iters=args.iters, warmup=warmup,
                                                target_s=seconds, probes=probes,
                                                after_rep=lambda i: bar.update(w))
                rates = {k: MATMUL_FLOPS / m.summary.median / 1e9 for k, m in measured.items() if m.summary}
                for row in rows:
                    gflops = flops / row.time.median / 1e9 if row.time is not None else None
                    share = f"{gflops / rates['fp32 bmm']:.0%}" if gflops and "fp32 bmm" in rates else ""
                    table.append([w, row.name, *timing_cells(row, "ms"), f"{gflops:.1f}" if gflops else "", share,
                                  note_cell(row)])
                    records.append(dict(workload=w, params=sum(a * b for a, b in shapes), ns_gflop=flops / 1e9,
                                        ns_gflop_per_s=gflops, **row.as_dict()))
                    rows_all.append(row)
                records.append(dict(workload=w, matmul_gflop_per_s=rates))
                table.append([w, "matmul rates", "", "", "", "",
                              " ".join(f"{k} {v:.0f}" for k, v in rates.items()), "GFLOP/s", ""])
        report.print_title(f"bench_muon.py ({args.mode})", env, reps)
        print(report.format_table(["workload", "impl", *timing_header("ms", BASELINE), "NS GFLOP/s",
                                   "of fp32 bmm", "note"], table))
        for line in error_summary(rows_all):
            print(line, file=sys.stderr)
        settings = dict(mode=args.mode, reps=reps, warmup=warmup, ns_steps=NS_STEPS, baseline=BASELINE)
        report.save(report.results_payload("muon", env, settings, records), name="muon", device=device.type,
                    out=args.out, devices_in_run=len(devices))
        failed = failed or any_errors(rows_all)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
