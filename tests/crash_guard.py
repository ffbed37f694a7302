"""Crash guard for the fuzz tests: run a hypothesis test in a child process.

A segfault or abort inside fusedopt._C would kill pytest itself and hide which
case did it. The child writes every case to a log *before* running it, so when
the child dies by a signal the parent test fails and prints the last case.
The child sees FUSEDOPT_FUZZ_CHILD=1 (the fuzz bodies skip without it),
FUSEDOPT_FUZZ_EXAMPLES and FUSEDOPT_FUZZ_LOG.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = os.environ.get("FUSEDOPT_FUZZ_CHILD") == "1"
LOG = os.environ.get("FUSEDOPT_FUZZ_LOG")


def log_case(text: str) -> None:
    """Appends one case to the log (in the child), before the case runs."""
    if LOG:
        with open(LOG, "a") as f:
            f.write(text + "\n")


def run_in_child(test_file: str, test_name: str, examples: int, tmp_path: Path, seed: int,
                 timeout: int = 900) -> None:
    """Runs ``test_file::test_name`` with ``examples`` hypothesis examples in a child pytest.

    ``seed`` (the parent test's) seeds hypothesis (--hypothesis-seed), so the
    same seed draws the same cases.

    Fails (printing the last logged case) if the child died by a signal; fails
    with the child's output if it failed otherwise.
    """
    log = tmp_path / f"{test_name}.log"
    env = dict(os.environ, FUSEDOPT_FUZZ_CHILD="1", FUSEDOPT_FUZZ_EXAMPLES=str(examples), FUSEDOPT_FUZZ_LOG=str(log))
    here = Path(test_file)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           f"--hypothesis-seed={seed}", f"{here}::{test_name}"], cwd=here.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:
        last = log.read_text().splitlines()[-1:] if log.exists() else ["(no case logged)"]
        pytest.fail(f"fuzz child died by signal {signal.Signals(-proc.returncode).name}; last case:\n"
                    f"{last[0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]
