"""Shared pytest setup: the `cuda` marker (and `requires_cuda`) skip without a
usable GPU; `slow` tests run only with --runslow; every test that takes the
`seed` fixture gets a fresh seed, printed and reported on failure."""
from __future__ import annotations

import os
import random

import pytest
import torch

import fusedopt

requires_cuda = pytest.mark.skipif(not fusedopt.cuda_available(), reason="needs a CUDA GPU and a CUDA build")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU and a fusedopt build with CUDA kernels")
    no_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "cuda" in item.keywords and not fusedopt.cuda_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(no_slow)


@pytest.fixture
def seed(request):
    """A fresh seed per test (FUSEDOPT_TEST_SEED pins it); printed so a failure can be replayed."""
    value = int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
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
                report.sections.append(("seed", f"reproduce with FUSEDOPT_TEST_SEED={value}"))
