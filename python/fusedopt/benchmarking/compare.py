"""Side-by-side comparison of named candidates on one workload.

A :class:`Candidate` builds its own state and returns the call to time. The harness builds them
all, times them interleaved (:func:`.timing.measure_interleaved`) and gives one :class:`Row` per
candidate: timed, skipped (a peer that is not installed or does not support this device), or an
error. An error is only possible for a candidate that must work (fusedopt's own rows): the
scripts exit non-zero when one happened, so a broken fusedopt row cannot hide in a table.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .report import median_cell, noisy_cell, ratio_cell, speedup_header, spread_cell
from .timing import Summary, describe, measure_interleaved, ratios

OK, SKIPPED, ERROR = "ok", "skipped", "error"


@dataclass
class Candidate:
    name: str
    setup: Callable[[], Callable[[], object]]  # builds state (untimed), returns the call to time
    must_work: bool = False  # fusedopt's rows: a failure is an error, not a skip
    note: str = ""  # e.g. "8-bit state": what differs from the others


class Unavailable(Exception):
    """Raised by a setup whose implementation cannot run here (peer missing, device unsupported)."""


@dataclass
class Row:
    name: str
    status: str
    reason: str = ""
    time: Optional[Summary] = None  # seconds per call
    speedup: Optional[Summary] = None  # baseline time / this time, per repetition
    note: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"impl": self.name, "status": self.status}
        if self.reason:
            d["reason"] = self.reason
        if self.note:
            d["note"] = self.note
        if self.time is not None:
            d["seconds_per_call"] = self.time.as_dict()
        if self.speedup is not None:
            d["speedup"] = self.speedup.as_dict()
        d.update(self.extra)
        return d


def run_candidates(candidates: Sequence[Candidate], *, baseline: str, device: torch.device, reps: int,
                   warmup: int, iters: Optional[int] = None, target_s: float = 0.2,
                   probes: Optional[Dict[str, Callable[[], object]]] = None,
                   after_rep: Optional[Callable[[int], None]] = None):
    """Build, time and summarize the candidates; ``probes`` are extra calls timed in the same
    interleaved repetitions (reference kernels such as a memory copy) and returned as Measured.

    Returns (rows in candidate order, {probe name: Measured})."""
    steps: Dict[str, Callable[[], object]] = {}
    rows: Dict[str, Row] = {}
    for c in candidates:
        try:
            steps[c.name] = c.setup()
        except Unavailable as exc:
            rows[c.name] = Row(c.name, SKIPPED, str(exc))
        except Exception as exc:
            rows[c.name] = Row(c.name, ERROR if c.must_work else SKIPPED, describe(exc))
    timed_names = list(steps)
    measured = measure_interleaved({**steps, **(probes or {})}, reps=reps, iters=iters, target_s=target_s,
                                   warmup=warmup, device=device, after_rep=after_rep)
    must_work = {c.name for c in candidates if c.must_work}
    base = measured.get(baseline)
    base_time = base.summary if base is not None else None
    for name in timed_names:
        m = measured[name]
        if m.error is not None:
            rows[name] = Row(name, ERROR if name in must_work else SKIPPED, m.error)
        else:
            t = m.summary
            rows[name] = Row(name, OK, time=t, speedup=ratios(base_time, t) if base_time is not None else None,
                             extra={"calls_per_rep": m.calls_per_rep})
    ordered = [rows[c.name] for c in candidates]
    for c, row in zip(candidates, ordered):
        row.note = c.note
    del steps
    gc.collect()  # the next workload's tensors should not share memory with this one's
    return ordered, {name: measured[name] for name in (probes or {})}


def any_errors(rows: Sequence[Row]) -> bool:
    return any(r.status == ERROR for r in rows)


# ---- the standard columns --------------------------------------------------------------------------
def timing_header(unit: str, baseline: str, per: str = "step") -> List[str]:
    return [f"{unit}/{per} median", "spread min-max (%)", speedup_header(baseline), "flag"]


def timing_cells(row: Row, unit: str) -> List[str]:
    """The four standard cells of a row (a row without times reads ERROR or skipped)."""
    if row.time is None:
        return ["ERROR" if row.status == ERROR else "skipped", "", "", ""]
    return [median_cell(row.time, unit), spread_cell(row.time, unit), ratio_cell(row.speedup), noisy_cell(row.time)]


def note_cell(row: Row) -> str:
    """The last column: why a row has no times, else what differs about it."""
    return _shorten(row.reason) if row.time is None else row.note


def _shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def error_summary(rows: Sequence[Row]) -> List[str]:
    """Full messages of the errors (the table cell is shortened)."""
    return [f"ERROR in {r.name}: {r.reason}" for r in rows if r.status == ERROR]


def target_line(rows: Dict[str, Row], what: str, num: str, den: str, bound: float, kind: str) -> Optional[dict]:
    """A benchmark target checked on the median of the per-repetition ratios of two
    rows' times (num / den): ``kind`` "min" (ratio >= bound) or "max" (ratio <= bound).
    None when either row has no time (skipped or failed)."""
    a, b = rows.get(num), rows.get(den)
    if a is None or b is None or a.time is None or b.time is None:
        return None
    ratio = ratios(a.time, b.time).median
    met = ratio >= bound if kind == "min" else ratio <= bound
    return dict(target=what, ratio=ratio, bound=f"{'>=' if kind == 'min' else '<='} {bound}", met=met)
