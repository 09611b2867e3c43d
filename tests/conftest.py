"""Fixtures for every test: a clean, seeded torch state in, no process group left behind out."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_state():
    """float32 default dtype and seed 0 everywhere before each test; tear down any process group after."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_default_dtype(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
