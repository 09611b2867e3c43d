"""Fixtures for every test: a clean, seeded torch state in, no process group left behind out; and under
``RAD_DS_REQUIRE_KERNELS=1`` (``scripts/gpu_check.sh``) no ``gpu`` test that skips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.helpers import REQUIRE_KERNELS, switch


@pytest.fixture(autouse=True)
def _torch_state():
    """float32 default dtype, seed 0 and one intra-op thread before each test (tiny matmuls are up to
    10x slower with several OpenMP threads on a busy 2-core machine); tear down any process group after."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_num_threads(n_threads)
    torch.set_default_dtype(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``RAD_DS_REQUIRE_KERNELS=1`` a skipped ``gpu`` test is reported as failed: the GPU check exists to run
    them, and any skip there (no CUDA, no kernels, a test's own guard) would leave it green having tested nothing."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("gpu") is not None
            and switch(REQUIRE_KERNELS)):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"{REQUIRE_KERNELS}=1: a gpu test may not skip, and this one did: {reason}"
