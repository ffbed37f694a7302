"""Shared pytest setup.

- ``@pytest.mark.cuda``: skipped without a usable GPU and a CUDA build;
  ``@pytest.mark.slow``: runs only with --runslow.
- Every test is seeded: the autouse ``seed`` fixture draws a fresh seed per
  test (FUSEDOPT_TEST_SEED pins it), seeds torch and random with it and prints
  it; a failure's report says how to replay it. Derive every other seed (a
  Generator, a hypothesis run, a spawned rank) from it.
- ``module_seed``: the same for setup a module's tests share (spawned ranks
  train once for all of them); a test that uses it is reported with it.
- fusedopt's CPU thread count is restored after every test, so a test may call
  fusedopt.set_num_threads without cleaning up.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import fusedopt


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


def _draw_seed() -> int:
    return int(os.environ.get("FUSEDOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test (FUSEDOPT_TEST_SEED pins it); printed so a failure can be replayed."""
    value = _draw_seed()
    torch.manual_seed(value)
    random.seed(value)
    print(f"\n[{request.node.name}] seed={value} (replay with FUSEDOPT_TEST_SEED={value})")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture(scope="module")
def module_seed(request):
    """One seed for the setup a module's tests share; the tests that take it report it instead of `seed`."""
    value = _draw_seed()
    print(f"\n[{request.module.__name__}] module_seed={value} (replay with FUSEDOPT_TEST_SEED={value})")
    return value


@pytest.fixture(autouse=True)
def _restore_num_threads():
    before = fusedopt.get_num_threads()
    yield
    fusedopt.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        value = funcargs.get("module_seed", funcargs.get("seed"))
        if value is None:  # the fixtures did not run (a setup error): the recorded one
            value = next((v for k, v in item.user_properties if k == "seed"), None)
        if value is not None:
            report.sections.append(("seed", f"reproduce with FUSEDOPT_TEST_SEED={value}"))
