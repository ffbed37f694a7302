"""Shared test helpers: fresh random seeds that are reported on failure."""
from __future__ import annotations

import os
import random

import pytest
import torch

import fusedopt

requires_cuda = pytest.mark.skipif(not fusedopt.cuda_available(), reason="needs a CUDA GPU and a CUDA build")


@pytest.fixture
def seed(request):
    """A fresh seed per test (FUSEDOPT_TEST_SEED pins it); printed so a failure can be replayed."""
    value = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"\n[{request.node.name}] seed={value} (replay with FUSEDOPT_TEST_SEED={value})")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"FUSEDOPT_TEST_SEED={value}"))
