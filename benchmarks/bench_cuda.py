"""CUDA benchmarks of issue 17: time per step against the measured copy bandwidth and torch.

    python benchmarks/bench_cuda.py --quick --out results.json   (about a minute on an H200)

The yardstick comes first: a device-to-device copy of a large buffer (bytes read + written over
its time). Each optimizer row then reports its time per step, the bytes its step must move
over that time as a percent of the copy rate, and its speed-up over torch's fused optimizer
where torch has one. Without a GPU it prints "skipped: no GPU" and exits 0.

Bytes moved per element per step (the fewest the step can move; from the optimizer docstrings:
SGD "param + grad + buffer", Adam "param + grad + moments [+ master]", LARS two passes, LAMB
"4 + 24 + 16 = 44"), fp32 unless said:
  Adam/AdamW      read p, g, m, v; write p, m, v                       7 x 4       = 28
  SGD momentum    read p, g, b; write p, b                             5 x 4       = 20
  Adam bf16 + master  read master, m, v (4 each), g (2);
                  write master, m, v (4 each), p (2)                   6 x 4 + 2x2 = 28
  LARS momentum   norms: read p, g (8); update: read p, g, b, write p, b (20)    = 28
  LAMB (clipping) grad norms: read g (4); pass 2: read p, g, m, v, write m, v (24);
                  pass 3: read p, m, v, write p (16)                             = 44
  Lanczos dots    read the basis rows and w (fp64): 8 x (rows + 1) per column
  Lanczos orthogonalize  read the basis rows, read and write w: 8 x (rows + 2)
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from fusedopt.benchmarking import cli, environment, report, timing, workloads

BYTES_PER_ELEMENT = {"adam": 28, "adamw": 28, "sgd-momentum": 20, "adam-bf16-master": 28, "lars": 28, "lamb": 44}
MODES = {"quick": dict(reps=5, warmup=2, target_s=0.03), "default": dict(reps=7, warmup=3, target_s=0.1),
         "full": dict(reps=11, warmup=3, target_s=0.3)}
BIG = 64 * 2**23  # 536,870,912 params (>= 500M) in 64 tensors of 8M: large tensors, a few launches
MANY = (10_000, 4096)  # tensor count and size of the row where per-tensor host work dominates


def copy_bandwidth(device: torch.device, nbytes: int, settings: dict) -> dict:
    """Bytes read + written per second of a device-to-device copy: the ceiling every row is held to."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    got = timing.measure_interleaved({"copy": lambda: dst.copy_(src)}, device=device, **settings)["copy"]
    moved = 2 * nbytes
    row = {"name": "copy", "bytes_per_step": moved, "time_s": got.summary.as_dict(),
           "copy_bytes_per_s": moved / got.summary.median}
    del src, dst
    return row


def make_params(shapes, dtype, device, seed=0):
    """Leaf params with random grads drawn on the GPU (drawing 500M on the CPU would take minutes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype))
        p.grad = torch.randn(s, device=device, generator=gen).mul_(1e-2).to(dtype)
        params.append(p)
    return params


def host_seconds(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float:
    """Median host time of one call (what the training loop's thread spends in step())."""
    samples = []
    for _ in range(calls):
        timing.synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    timing.synchronize(device)
    return sorted(samples)[len(samples) // 2]


def compare(name: str, make: Dict[str, Callable[[], Callable[[], object]]], *, elements: int, bytes_per_element,
            copy_rate: float, settings: dict, device: torch.device, host: bool = False) -> dict:
    """Time fusedopt (the first entry of ``make``) against the baseline (the second, if any),
    interleaved. Each entry builds its own params and optimizer, so the two share nothing."""
    fns = {impl: build() for impl, build in make.items()}
    got = timing.measure_interleaved(fns, device=device, **settings)
    impls = list(make)
    ours = got[impls[0]]
    row: dict = {"name": name, "elements": elements, "impl": impls[0]}
    if ours.error:
        row["error"] = ours.error
        return row
    row["time_s"] = ours.summary.as_dict()
    if bytes_per_element is not None:
        moved = elements * bytes_per_element
        row.update(bytes_per_step=moved, pct_copy_bw=100 * moved / ours.summary.median / copy_rate)
    if len(impls) > 1:
        base = got[impls[1]]
        row["baseline"] = impls[1]
        if base.error:
            row["baseline_error"] = base.error
        else:
            row["baseline_time_s"] = base.summary.as_dict()
            row["speedup"] = timing.ratios(base.summary, ours.summary).as_dict()
    if host:
        row["host_s"] = {impl: host_seconds(fn, device) for impl, fn in fns.items()}
    del fns
    torch.cuda.empty_cache()
    return row


def optimizer_step(cls, shapes, dtype, device, **kw) -> Callable[[], Callable[[], object]]:
    def build():
        opt = cls(make_params(shapes, dtype, device), **kw)
        return opt.step
    return build


def lanczos_rows(device, copy_rate, settings, n: int = 2**23) -> List[dict]:
    """The Lanczos vector kernels (fp64, a 32-row basis of ``n`` columns) against torch's matmuls."""
    from fusedopt import _kernels  # no public wrapper: these are the kernels eigsh runs on

    rows = 32
    basis = torch.randn(rows, n, dtype=torch.float64, device=device)
    w = torch.randn(n, dtype=torch.float64, device=device)
    h = torch.randn(rows, dtype=torch.float64, device=device)
    dots = compare("lanczos-dots", {"fusedopt": lambda: lambda: _kernels.lanczos_dots(basis, rows, w),
                                    "torch mv": lambda: lambda: basis @ w},
                   elements=n, bytes_per_element=8 * (rows + 1), copy_rate=copy_rate, settings=settings,
                   device=device)

    def torch_orth():  # what the kernel fuses: the update, then the norm
        w.sub_(basis.T @ h)
        return w.norm()
    orth = compare("lanczos-orthogonalize", {"fusedopt": lambda: lambda: _kernels.lanczos_orthogonalize(basis, rows, w, h),
                                             "torch": lambda: torch_orth},
                   elements=n, bytes_per_element=8 * (rows + 2), copy_rate=copy_rate, settings=settings,
                   device=device)
    return [dots, orth]


def run(settings: dict, device: torch.device, copy_bytes: int,
        on_row: Callable[[List[dict]], None] = lambda rows: None) -> List[dict]:
    """Every row, in order; ``on_row(rows so far)`` after each (to save what a timeout would lose)."""
    import fusedopt

    results = [copy_bandwidth(device, copy_bytes, settings)]
    rate = results[0]["copy_bytes_per_s"]
    print(f"copy: {rate / 1e12:.2f} TB/s (read + write)", flush=True)
    big = [(min(BIG, 2**23),)] * max(1, BIG // 2**23)
    f32, bf16 = torch.float32, torch.bfloat16

    def add(row):
        results.append(row)
        on_row(results)
        print(row["name"], {k: row[k] for k in ("pct_copy_bw", "error") if k in row},
              f"{row['time_s']['median'] * 1e3:.3g} ms" if "time_s" in row else "", flush=True)

    common = dict(copy_rate=rate, settings=settings, device=device)
    add(compare("adam-fp32-500M", {"fusedopt": optimizer_step(fusedopt.Adam, big, f32, device),
                                   "torch fused": optimizer_step(torch.optim.Adam, big, f32, device, fused=True)},
                elements=BIG, bytes_per_element=BYTES_PER_ELEMENT["adam"], **common))
    add(compare("adamw-fp32-500M", {"fusedopt": optimizer_step(fusedopt.AdamW, big, f32, device),
                                    "torch fused": optimizer_step(torch.optim.AdamW, big, f32, device, fused=True)},
                elements=BIG, bytes_per_element=BYTES_PER_ELEMENT["adamw"], **common))
    add(compare("sgd-momentum-fp32-500M",
                {"fusedopt": optimizer_step(fusedopt.SGD, big, f32, device, lr=0.1, momentum=0.9),
                 "torch fused": optimizer_step(torch.optim.SGD, big, f32, device, lr=0.1, momentum=0.9, fused=True)},
                elements=BIG, bytes_per_element=BYTES_PER_ELEMENT["sgd-momentum"], **common))
    # torch has no master weights: its row is fused Adam on the bf16 params alone (fewer bytes).
    add(compare("adam-bf16-master-500M",
                {"fusedopt": optimizer_step(fusedopt.Adam, big, bf16, device, master_weights=True),
                 "torch fused (bf16, no master)": optimizer_step(torch.optim.Adam, big, bf16, device, fused=True)},
                elements=BIG, bytes_per_element=BYTES_PER_ELEMENT["adam-bf16-master"], **common))
    for model, shapes in (("resnet50", workloads.resnet50_shapes()), ("bert-large", workloads.bert_large_shapes())):
        n = workloads.numel(shapes)
        # No torch LARS/LAMB: these rows are held to their byte floors only. Weight decay makes
        # LARS adapt (with none it skips the norm pass and is plain SGD).
        add(compare(f"lars-{model}", {"fusedopt": optimizer_step(fusedopt.LARS, shapes, f32, device, momentum=0.9,
                                                                 weight_decay=1e-4)},
                    elements=n, bytes_per_element=BYTES_PER_ELEMENT["lars"], **common))
        add(compare(f"lamb-{model}", {"fusedopt": optimizer_step(fusedopt.LAMB, shapes, f32, device)},
                    elements=n, bytes_per_element=BYTES_PER_ELEMENT["lamb"], **common))
    many = [(MANY[1],)] * MANY[0]
    add(compare(f"adam-{MANY[0]}x{MANY[1]}", {"fusedopt": optimizer_step(fusedopt.Adam, many, f32, device),
                                    "torch fused": optimizer_step(torch.optim.Adam, many, f32, device, fused=True)},
                elements=workloads.numel(many), bytes_per_element=BYTES_PER_ELEMENT["adam"], host=True, **common))
    for row in lanczos_rows(device, rate, settings):
        add(row)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.benchmark_parser("bench_cuda.py", __doc__.split("\n\n")[0], devices=("cuda",), calls=False)
    args = cli.parse(ap, argv)
    import fusedopt

    if not (torch.cuda.is_available() and fusedopt.cuda_available()):
        print("skipped: no GPU")
        return 0
    device = torch.device("cuda")
    mode = dict(MODES[args.mode])
    if args.reps:
        mode["reps"] = args.reps
    env = environment.capture(device)

    def payload(rows):
        return report.results_payload("bench_cuda", env, dict(mode=args.mode, **mode), rows,
                                      bytes_per_element=BYTES_PER_ELEMENT)

    def partial(rows):  # a named --out is rewritten after every row: a killed run keeps its rows
        if args.out not in (None, "none"):
            report.write_results(payload(rows), name="bench_cuda", device="cuda", out=args.out)

    rows = run(mode, device, copy_bytes=2**32, on_row=partial)  # 4 GiB: far past the 60 MB L2
    report.save(payload(rows), name="bench_cuda", device="cuda", out=args.out)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
