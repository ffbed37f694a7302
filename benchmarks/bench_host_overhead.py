"""Host time of optimizer.step() for many small params on CPU, fusedopt next to
torch's fused (and foreach) implementations.

With 1000 params of 64 elements the arithmetic is negligible, so the time is
the per-step host work: Python, checks, pointer gathering, dispatch. Runs each
optimizer interleaved, in several rounds, and reports the median per step.

    python benchmarks/bench_host_overhead.py [--params 1000] [--numel 64] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

import fusedopt


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def make(n, numel, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(numel, generator=g).requires_grad_() for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(numel, generator=g)
    return ps


CASES = {
    "SGD(momentum)": (lambda ps: fusedopt.SGD(ps, lr=0.01, momentum=0.9),
                      {"torch fused": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True),
                       "torch foreach": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True)}),
    "Adam": (lambda ps: fusedopt.Adam(ps, lr=1e-3),
             {"torch fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
              "torch foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)}),
    "AdamW": (lambda ps: fusedopt.AdamW(ps, lr=1e-3),
              {"torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
               "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)}),
}


def time_steps(opt, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1000)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "host_overhead.json"))
    a = ap.parse_args()
    rows = []
    for case, (ours, theirs) in CASES.items():
        opts = {"fusedopt": ours(make(a.params, a.numel))}
        opts.update({k: f(make(a.params, a.numel)) for k, f in theirs.items()})
        for o in opts.values():
            time_steps(o, 5)  # state creation, caches
        samples = {k: [] for k in opts}
        for _ in range(a.rounds):
            for k, o in opts.items():
                samples[k].append(time_steps(o, a.steps))
        med = {k: statistics.median(v) for k, v in samples.items()}
        for k, v in med.items():
            rows.append(dict(optimizer=case, impl=k, us_per_step=v * 1e6, ratio_to_torch_fused=v / med["torch fused"]))
    print(f"host time of step(): {a.params} params x {a.numel} elements, CPU, "
          f"{fusedopt.get_num_threads()} fusedopt threads, torch {torch.__version__}")
    print(f"{'optimizer':<15}{'impl':<16}{'us/step':>10}{'vs torch fused':>16}")
    for r in rows:
        print(f"{r['optimizer']:<15}{r['impl']:<16}{r['us_per_step']:>10.1f}{r['ratio_to_torch_fused']:>15.2f}x")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(benchmark="host_overhead", device=platform.processor() or platform.machine(),
                       cpu_count=os.cpu_count(), torch=torch.__version__, fusedopt=fusedopt.__version__,
                       git_commit=git_commit(), params=a.params, numel=a.numel, steps=a.steps,
                       rounds=a.rounds, results=rows), f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
