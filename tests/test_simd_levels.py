"""The CPU kernels are compiled once per SIMD level (csrc/cpu/simd.h) and the suite
runs at the best level of the machine. The lower levels have code of their own (the
8-bit codec's AVX2 and portable paths, the portable fallbacks): run the exactness
tests again under each lower level, in a subprocess, since the level is chosen
once per process (FUSEDOPT_SIMD caps it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusedopt

LEVELS = ["baseline", "avx2", "avx512"]
HERE = Path(__file__).resolve().parent
# Tests that compare kernels bit for bit against references written from the definitions.
EXACT_TESTS = ["test_quant8.py", "test_stochastic_rounding.py", "test_functional.py"]


def _lower_levels():
    best = fusedopt.build_info()["cpu_simd"]
    return LEVELS[:LEVELS.index(best)] if best in LEVELS else []


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_exactness_tests_pass_at_lower_simd_level(level, seed):
    if level not in _lower_levels():
        pytest.skip(f"this CPU's best level ({fusedopt.build_info()['cpu_simd']}) is not above {level}")
    env = dict(os.environ, FUSEDOPT_SIMD=level, FUSEDOPT_TEST_SEED=str(seed))
    probe = subprocess.run([sys.executable, "-c", "import fusedopt; print(fusedopt.build_info()['cpu_simd'])"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == level
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           *[str(HERE / t) for t in EXACT_TESTS]]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
