"""Tables and result files.

Every table has the same timing columns: the median, its min-max spread and a ``noisy`` flag,
then a speed-up column whose header names its baseline. A speed-up is always the baseline's
time over the row's time (repetition by repetition, then the median), so above 1 means the row
is faster, in every script.

Results never overwrite a tracked file: by default each run writes a new timestamped file
(benchmarks/results/ in a source checkout, the current directory otherwise); committed reference
results keep their own names and a run can only add beside them.
"""
from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

from .timing import NOISY_SPREAD, Summary

NOISY_MARK = "noisy"
SOURCE_ROOT = Path(__file__).resolve().parents[3]


def speedup_header(baseline: str) -> str:
    return f"speed-up vs {baseline}, higher is better"


def format_seconds(seconds: float, unit: str) -> str:
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    value = seconds * scale
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def median_cell(summary: Summary, unit: str) -> str:
    return format_seconds(summary.median, unit)


def spread_cell(summary: Summary, unit: str) -> str:
    """min-max, then (max - min) / median in percent: the number the noisy flag is about."""
    return f"{format_seconds(summary.low, unit)}-{format_seconds(summary.high, unit)} ({100 * summary.spread:.0f}%)"


def ratio_cell(summary: Optional[Summary]) -> str:
    if summary is None:
        return "n/a"
    return f"{summary.median:.2f}x ({summary.low:.2f}-{summary.high:.2f})"


def noisy_cell(summary: Summary) -> str:
    return NOISY_MARK if summary.noisy else ""


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell; the first text column left-aligned, numbers right."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]

    def line(cells):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            text = str(cell)
            out.append(text.ljust(width) if i == 0 or not _numeric(text) else text.rjust(width))
        return "  ".join(out).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+." or text == "n/a")


# ---- result files ------------------------------------------------------------------------------------
def is_tracked(path: Path) -> bool:
    """True when git tracks ``path`` in the checkout that holds it."""
    path = Path(path).resolve()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        out = subprocess.run(["git", "ls-files", "--error-unmatch", "--", str(path)], cwd=parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def check_out_path(out: Optional[str]) -> Optional[str]:
    """The complaint about a user's --out path, or None when it may be written."""
    if out is None or out == "none":
        return None
    path = Path(out)
    if path.is_dir():
        return f"--out {out}: is a folder; give a file path"
    if is_tracked(path):  # also when deleted from the working tree: writing it would recreate it
        return (f"--out {out}: refusing to overwrite a file git tracks (committed results keep their "
                "names); give a new path")
    return None


def default_results_dir() -> Path:
    """benchmarks/results/ of the source checkout this package runs from, else the current folder."""
    for root in (SOURCE_ROOT, Path.cwd()):
        if (root / "benchmarks").is_dir() and (root / "pyproject.toml").is_file():
            return root / "benchmarks" / "results"
    return Path.cwd()


def new_results_path(name: str, device: str, folder: Optional[Path] = None, now: Optional[datetime.datetime] = None
                     ) -> Path:
    """``<folder>/<name>_<device>_<YYYYmmdd-HHMMSS>.json``, with ``-2``, ``-3``... until the name is new."""
    folder = Path(folder) if folder is not None else default_results_dir()
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    prefix = "" if folder.name == "results" else "fusedopt_"
    path, n = folder / f"{prefix}{name}_{device}_{stamp}.json", 2
    while path.exists():
        path, n = folder / f"{prefix}{name}_{device}_{stamp}-{n}.json", n + 1
    return path


def write_results(payload: dict, *, name: str, device: str, out: Optional[str], devices_in_run: int = 1
                  ) -> Optional[Path]:
    """Write one run's JSON. ``out``: None for a new timestamped file, "none" to skip, else the
    user's path (with ``_<device>`` added when one run covers several devices). Never replaces a
    tracked file; a default path is created exclusively, so it never replaces anything."""
    if out == "none":
        return None
    if out is None:
        path = new_results_path(name, device)
        mode = "x"
    else:
        path = Path(out)
        if devices_in_run > 1:
            path = path.with_name(f"{path.stem}_{device}{path.suffix or '.json'}")
        problem = check_out_path(str(path))
        if problem:
            raise FileExistsError(problem)
        mode = "w"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    return path


def save(payload: dict, **where) -> Optional[Path]:
    """:func:`write_results`, and say where the file went."""
    path = write_results(payload, **where)
    if path is not None:
        print(f"wrote {path}")
    return path


def print_title(title: str, env: dict, reps: int) -> None:
    """The lines above a table: what ran, on what, and how the rows were measured."""
    from .environment import busy_warning, headline

    print(f"\n{title} on {headline(env)}")
    if busy_warning(env):
        print(busy_warning(env))
    print(f"median of {reps} interleaved repetitions; spread = min-max over them, {NOISY_MARK} above "
          f"{100 * NOISY_SPREAD:.0f}%")


def results_payload(benchmark: str, environment: dict, settings: dict, rows: List[dict], **extra) -> dict:
    """The JSON every benchmark writes: what ran, where, how, and one dict per table row."""
    return {"benchmark": benchmark, "schema": 1, "environment": environment, "settings": settings,
            "definitions": {"spread": "min-max over repetitions; spread fraction = (max - min) / median",
                            "noisy": f"spread fraction above {NOISY_SPREAD:.2f}",
                            "speedup": "baseline time / row time per repetition, median; > 1 is faster"},
            "rows": rows, **extra}
