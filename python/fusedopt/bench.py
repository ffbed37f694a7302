"""Optimizer step benchmark: fusedopt against torch.optim's for-loop, foreach and fused paths.

Run as ``python -m fusedopt bench`` (or ``fusedopt bench``, or
``python benchmarks/bench_optim.py``). Workloads are the parameter shapes of
ResNet-50 (161 tensors, 25.6M params), GPT-2 small (148 tensors, 124M params)
and 5000 tensors of 1000 elements. Each implementation gets its own params and
state; grads are shared (they are only read).

Timing: warm-up steps, then several repetitions of ``iters`` steps each, the
implementations interleaved within every repetition so that drift of a shared
machine hits them alike; the median per-step time is reported. On CUDA the
whole ``step()`` call is timed with events around the repetition.

Effective bandwidth counts the bytes an fp32 step must move: Adam/AdamW 28 B
per param (read p, g, m, v; write p, m, v), SGD with momentum 20 B (read p, g,
buf; write p, buf).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

BYTES_PER_PARAM = {"adam": 28, "adamw": 28, "sgd": 20}
IMPLS = ("torch-forloop", "torch-foreach", "torch-fused", "fusedopt")


# ---- workloads --------------------------------------------------------------------------------
def resnet50_shapes() -> List[Shape]:
    """torchvision resnet50's 161 parameter tensors (25,557,032 params), in module order."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:  # projection shortcut
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_small_shapes() -> List[Shape]:
    """GPT-2 small (HF layout, tied lm_head): 148 tensors, 124,439,808 params."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def many_small_shapes(n: int = 5000, size: int = 1000) -> List[Shape]:
    return [(size,)] * n


def tiny_shapes() -> List[Shape]:
    """A few odd shapes: a smoke test of the runner, not a benchmark (not in the default set)."""
    return [(), (7,), (33, 5), (1000,)]


WORKLOADS: Dict[str, Callable[[], List[Shape]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "5000x1000": many_small_shapes,
    "tiny": tiny_shapes,
}
DEFAULT_WORKLOADS = ("resnet50", "gpt2-small", "5000x1000")


def numel(shapes: Sequence[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


# ---- implementations --------------------------------------------------------------------------
def make_optimizer(impl: str, opt: str, params: List[torch.Tensor]) -> torch.optim.Optimizer:
    import fusedopt

    kwargs = {"adam": dict(lr=1e-3, weight_decay=0.0), "adamw": dict(lr=1e-3, weight_decay=1e-2),
              "sgd": dict(lr=1e-2, momentum=0.9)}[opt]
    if impl == "fusedopt":
        cls = {"adam": fusedopt.Adam, "adamw": fusedopt.AdamW, "sgd": fusedopt.SGD}[opt]
        return cls(params, **kwargs)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]
    mode = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
            "torch-fused": dict(fused=True)}[impl]
    return cls(params, **kwargs, **mode)


class Runner:
    """One implementation's params, state and step function."""

    def __init__(self, impl: str, opt: str, base: List[torch.Tensor], grads: List[torch.Tensor]):
        self.impl = impl
        self.params = [b.clone() for b in base]
        for p, g in zip(self.params, grads):
            p.grad = g
        try:
            self.optimizer = make_optimizer(impl, opt, self.params)
            self.optimizer.step()  # creates the state outside the timed region
            self.error = None
        except Exception as e:  # e.g. a torch build without a fused kernel for this device
            self.optimizer, self.error = None, f"{type(e).__name__}: {e}"

    def step(self) -> None:
        self.optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(runner: Runner, iters: int, device: torch.device) -> float:
    """Seconds per step of `iters` back-to-back steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(iters):
            runner.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.step()
    return (time.perf_counter() - t0) / iters


# ---- progress -------------------------------------------------------------------------------
class Progress:
    """tqdm when installed, otherwise one line per update on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(1)
        else:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            print(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- environment ----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    for cwd in (Path.cwd(), here):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
                return out.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def environment(device: torch.device) -> dict:
    import fusedopt

    return {
        "device": str(device), "device_name": device_name(device), "torch_version": torch.__version__,
        "fusedopt_version": fusedopt.__version__, "fusedopt_build": fusedopt.build_info(),
        "git_commit": git_commit(), "torch_threads": torch.get_num_threads(),
        "fusedopt_threads": fusedopt.get_num_threads(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- the benchmark --------------------------------------------------------------------------
def bench_case(workload: str, opt: str, device: torch.device, reps: int, iters: int, warmup: int,
               impls: Sequence[str]) -> List[dict]:
    shapes = WORKLOADS[workload]()
    n = numel(shapes)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-2).to(device) for s in shapes]
    runners = [Runner(impl, opt, base, grads) for impl in impls]
    del base
    live = [r for r in runners if r.error is None]
    for r in live:
        for _ in range(warmup):
            r.step()
    sync(device)
    times: Dict[str, List[float]] = {r.impl: [] for r in live}
    for rep in range(reps):
        order = live if rep % 2 == 0 else live[::-1]  # interleave, alternating order
        for r in order:
            times[r.impl].append(time_steps(r, iters, device))
    rows = []
    for r in runners:
        row = dict(workload=workload, optimizer=opt, impl=r.impl, tensors=len(shapes), params=n)
        if r.error is not None:
            row.update(error=r.error)
        else:
            t = statistics.median(times[r.impl])
            row.update(seconds_per_step=t, min_seconds_per_step=min(times[r.impl]),
                       all_seconds_per_step=times[r.impl],
                       effective_gb_per_s=BYTES_PER_PARAM[opt] * n / t / 1e9)
        rows.append(row)
    fused = next((x for x in rows if x["impl"] == "torch-fused" and "seconds_per_step" in x), None)
    for row in rows:
        if fused is not None and "seconds_per_step" in row:
            row["speedup_vs_torch_fused"] = fused["seconds_per_step"] / row["seconds_per_step"]
    del runners, live
    return rows


def format_table(rows: Sequence[dict], device: str) -> str:
    head = f"{'device':6} {'workload':11} {'opt':6} {'impl':14} {'ms/step':>10} {'GB/s':>8} {'vs torch fused':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "seconds_per_step" not in r:
            lines.append(f"{device:6} {r['workload']:11} {r['optimizer']:6} {r['impl']:14} "
                         f"{'n/a':>10} {'':>8} {'':>15}  ({r['error'][:60]})")
            continue
        ratio = r.get("speedup_vs_torch_fused")
        lines.append(f"{device:6} {r['workload']:11} {r['optimizer']:6} {r['impl']:14} "
                     f"{r['seconds_per_step'] * 1e3:10.3f} {r['effective_gb_per_s']:8.2f} "
                     f"{(f'{ratio:.2f}x' if ratio else 'n/a'):>15}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fusedopt bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="cpu, cuda, or all (cpu, and cuda when available; default)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions; on CPU skip GPT-2 small")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    ap.add_argument("--optimizers", nargs="+", choices=list(BYTES_PER_PARAM), default=["adam", "adamw", "sgd"])
    ap.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per implementation (median reported)")
    ap.add_argument("--iters", type=int, default=None, help="steps per repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and fusedopt (default: all)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/optim_<device>_<time>.json when run in the "
                         "source tree, else ./fusedopt_bench_<device>_<time>.json); 'none' to skip")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def default_out(device: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks").is_dir() and (root / "pyproject.toml").is_file():
            return root / "benchmarks" / "results" / f"optim_{device}_{stamp}.json"
    return Path.cwd() / f"fusedopt_bench_{device}_{stamp}.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import fusedopt

    if args.threads:
        torch.set_num_threads(args.threads)
        fusedopt.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available() and fusedopt.cuda_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            print("CUDA requested but not available (torch.cuda.is_available()="
                  f"{torch.cuda.is_available()}, fusedopt CUDA build={fusedopt.build_info()['cuda_compiled']})",
                  file=sys.stderr)
            return 2
    status = 0
    for device in devices:
        workloads = args.workloads or [w for w in DEFAULT_WORKLOADS
                                       if not (args.quick and device.type == "cpu" and w == "gpt2-small")]
        reps = args.reps or (3 if args.quick else 5)
        cases = [(w, o) for w in workloads for o in args.optimizers]
        env = environment(device)  # before timing: the commit is the code that runs
        progress = Progress(len(cases), enabled=not args.no_progress)
        rows = []
        for w, o in cases:
            iters = args.iters or (2 if (device.type == "cpu" and w == "gpt2-small") else
                                   (5 if device.type == "cpu" else 20))
            rows += bench_case(w, o, device, reps, iters, args.warmup, args.impls)
            progress.update(f"{device.type} {w} {o}")
        progress.close()
        print(f"\nfusedopt bench on {env['device_name']} ({device.type}), torch {env['torch_version']}, "
              f"commit {env['git_commit']}, threads torch={env['torch_threads']} "
              f"fusedopt={env['fusedopt_threads']}; median of {reps} reps, interleaved")
        print(format_table(rows, device.type))
        if args.out != "none":
            out = Path(args.out) if args.out else default_out(device.type)
            if args.out and len(devices) > 1:
                out = out.with_name(f"{out.stem}_{device.type}{out.suffix}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"environment": env, "settings": {
                "reps": reps, "warmup": args.warmup, "quick": args.quick,
                "bytes_per_param": BYTES_PER_PARAM}, "results": rows}, indent=2))
            print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
