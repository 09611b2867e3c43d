"""On a CUDA machine (``pytest -m gpu``; ``scripts/gpu_check.sh`` runs it): the ZeRO-3 construction and the
one-copy teacher in bf16 on the mamba-ssm kernel path, against the two-engine path on the same GPU."""

from __future__ import annotations

import pytest
import torch

from tests.distill_helpers import run_args, save_base, write_text_jsonl
from tests.helpers import cuda_with_kernels
from tests.test_distill import L, _distill, _final_state

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    """Skips without CUDA; with CUDA, kernels that do not import are a failure (``tests.helpers.cuda_with_kernels``)."""
    return cuda_with_kernels()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero3_construction_and_one_copy_on_cuda(cuda, tmp_path, dtype):
    base = save_base(tmp_path, num_hidden_layers=5)
    data = write_text_jsonl(tmp_path / "text.jsonl", n=48)
    args = run_args(tmp_path, base, data, None, steps=3) + ["--layers", "2,4", f"--model.dtype={dtype}"]
    two = _distill(L.make_config([*args, "--out", str(tmp_path / "two"), "--teacher.location=zero3"]))
    one = _distill(L.make_config([*args, "--out", str(tmp_path / "one")]))
    assert one.summary["teacher_location"] == "shared" and two.summary["teacher_location"] == "zero3"
    assert next(one.engine.module.parameters()).device.type == "cuda"
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(one.losses, two.losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=tol)
    fa, fb = _final_state(one.export), _final_state(two.export)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=tol, atol=tol * 1e-2, msg=k)
