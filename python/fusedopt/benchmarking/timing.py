"""Timing: warm-up, interleaved repetitions, and the summary every table shows.

The machines these benchmarks run on are shared, and their speed drifts by tens of percent
within a minute. Two rules follow. Implementations that are compared run interleaved: each
repetition runs every one of them once, in alternating order, so a slow spell hits all of
them alike. And a row reports its spread next to its median, flagged as noisy when the
repetitions disagree by more than :data:`NOISY_SPREAD`, so a reader can tell a difference
from the weather.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

NOISY_SPREAD = 0.20
"""A row is noisy when (max - min) / median of its repetitions exceeds this."""


@dataclass(frozen=True)
class Summary:
    """Median and min-max spread of a row's repetitions (seconds, or a ratio)."""

    samples: Tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Summary":
        if not samples:
            raise ValueError("a summary needs at least one sample")
        return cls(tuple(float(s) for s in samples))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree, as a fraction of the median."""
        median = self.median
        return (self.high - self.low) / median if median else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def scaled(self, factor: float) -> "Summary":
        return Summary(tuple(s * factor for s in self.samples))

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "spread": self.spread,
                "noisy": self.noisy, "samples": list(self.samples)}


def ratios(numerators: Summary, denominators: Summary) -> Summary:
    """Repetition-by-repetition ratios. Interleaving makes repetition i of two rows neighbours in
    time, so their ratio cancels most of the machine's drift: its spread is the honest one."""
    if len(numerators.samples) != len(denominators.samples):
        raise ValueError("ratios need the same number of repetitions on both sides")
    return Summary(tuple(a / b for a, b in zip(numerators.samples, denominators.samples)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of ``iters`` back-to-back calls. On CUDA, events around the calls time the
    GPU work and the host work together, as a training loop sees them."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


@dataclass
class Measured:
    """What became of one named callable: its per-repetition times, or why it has none."""

    samples: List[float]
    error: Optional[str] = None  # the exception that stopped it ("TypeName: message")
    calls_per_rep: int = 0

    @property
    def summary(self) -> Optional[Summary]:
        return Summary.of(self.samples) if self.error is None and self.samples else None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def iters_for(seconds_per_call_once: float, target_s: float, most: int = 10_000) -> int:
    """Calls per repetition so that one repetition takes about ``target_s``: short calls are
    repeated until the timer's resolution and the loop's own cost no longer matter."""
    return max(1, min(most, math.ceil(target_s / max(seconds_per_call_once, 1e-9))))


def measure_interleaved(fns: Mapping[str, Callable[[], object]], *, reps: int, warmup: int, device: torch.device,
                        iters: Optional[int] = None, target_s: float = 0.2,
                        after_rep: Optional[Callable[[int], None]] = None) -> Dict[str, Measured]:
    """Warm every callable up, then time ``reps`` repetitions of each, interleaved, the order
    reversed every other repetition (so no callable always runs right after the same one).

    A repetition is ``iters`` calls, or when ``iters`` is None as many as take about
    ``target_s``, judged from the last warm-up call (there is at least one warm-up call then).
    A callable that raises is dropped from the remaining repetitions and reported with its
    error; the others go on. ``after_rep(i)`` runs after repetition i (progress)."""
    results = {name: Measured([]) for name in fns}
    calls: Dict[str, int] = {}
    live = list(fns)

    def attempt(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # reported in the row, never hidden
            results[name].error = describe(exc)
            live.remove(name)

    def prepare(name: str) -> None:
        # The last warm-up call is timed and sets the calls per repetition: no extra call for it.
        last = None
        for _ in range(warmup if iters is not None else max(warmup, 1)):
            last = seconds_per_call(fns[name], 1, device)
        calls[name] = iters if iters is not None else iters_for(last, target_s)

    for name in list(live):
        attempt(name, lambda: prepare(name))
    synchronize(device)
    for rep in range(reps):
        for name in (live if rep % 2 == 0 else live[::-1])[:]:
            attempt(name, lambda: results[name].samples.append(seconds_per_call(fns[name], calls[name], device)))
        if after_rep is not None:
            after_rep(rep)
    for name, n in calls.items():
        results[name].calls_per_rep = n
    return results
