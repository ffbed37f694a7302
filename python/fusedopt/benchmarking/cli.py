"""The options every benchmark takes, checked by argparse so a bad value is one clear line, not a
traceback: ``--quick``/``--full``, ``--device``, ``--reps``, ``--iters``, ``--warmup``,
``--threads``, ``--out``, ``--no-progress``."""
from __future__ import annotations

import argparse
from typing import Callable, List, Optional

import torch

from .._cli_types import fraction_of_one, integer_at_least  # noqa: F401 - part of this module's API
from .report import check_out_path

MIN_REPS = 3  # fewer repetitions give no spread worth printing


def benchmark_parser(prog: str, description: str, *, devices=("cpu", "cuda", "all"), calls: bool = True
                     ) -> argparse.ArgumentParser:
    """A parser with the shared options; a benchmark adds its own, then calls :func:`parse`.
    ``calls=False``: no --iters/--warmup (a benchmark that times whole runs, not repeated calls)."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke-size run (seconds): does it work, roughly")
    size.add_argument("--full", action="store_true", help="the whole suite (minutes)")
    ap.add_argument("--device", choices=list(devices), default=devices[-1] if "all" in devices else devices[0],
                    help="where to run" + (" (all: the CPU, and CUDA when available)" if "all" in devices else ""))
    ap.add_argument("--reps", metavar="N", type=integer_at_least(MIN_REPS, " (the spread needs 3 or more)"),
                    default=None,
                    help=f"interleaved repetitions per row (>= {MIN_REPS}; median and spread over them)")
    if calls:
        ap.add_argument("--iters", metavar="N", type=integer_at_least(1), default=None,
                        help="calls timed per repetition (default: as many as fill the mode's time per repetition)")
        ap.add_argument("--warmup", metavar="N", type=integer_at_least(0), default=None,
                        help="untimed calls before the first repetition (default 1)")
    ap.add_argument("--threads", metavar="N", type=integer_at_least(1), default=None,
                    help="threads for torch and fusedopt (default: all usable cores)")
    ap.add_argument("--out", metavar="PATH", default=None,
                    help="JSON path (default: a new timestamped file under benchmarks/results/ in a source "
                         "checkout, else in the current folder); 'none' to skip. A tracked file is never overwritten")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse, then the checks that argparse's types cannot make alone (still reported by argparse)."""
    args = ap.parse_args(argv)
    problem = check_out_path(args.out)
    if problem:
        ap.error(problem)
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    return args


def pick(value, mode: str, by_mode: dict):
    """The user's value when given, else the mode's."""
    return value if value is not None else by_mode[mode]


def apply_threads(threads: Optional[int]) -> None:
    if threads:
        import fusedopt

        torch.set_num_threads(threads)
        fusedopt.set_num_threads(threads)


def resolve_devices(ap: argparse.ArgumentParser, choice: str) -> List[torch.device]:
    """The devices of ``--device``; asking for CUDA where it cannot run is a usage error."""
    import fusedopt

    cuda_ok = torch.cuda.is_available() and fusedopt.cuda_available()
    if choice == "cuda" and not cuda_ok:
        ap.error(f"--device cuda: not available here (torch.cuda.is_available()={torch.cuda.is_available()}, "
                 f"fusedopt CUDA build={fusedopt.build_info()['cuda_compiled']})")
    devices = []
    if choice in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if choice == "cuda" or (choice == "all" and cuda_ok):
        devices.append(torch.device("cuda"))
    return devices
