"""Fixtures for every test: a clean, seeded torch state in, no process group left behind out."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


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
