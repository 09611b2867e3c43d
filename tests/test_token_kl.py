"""The shared token KL (rad_ds.core.token_kl) against KL written out in float64, and the one attention-layer list
(rad_ds.core.layers.attention_layers) against its definition."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rad_ds.core.layers import attention_layers
from rad_ds.core.token_kl import log_probs, token_kl


def _kl64(t_logits, s_logits):
    """KL(p || q) per row, p = softmax(t), q = softmax(s), summed term by term in float64 Python arithmetic."""
    out = []
    for t, s in zip(t_logits.double().tolist(), s_logits.double().tolist()):
        zt, zs = math.log(sum(math.exp(x) for x in t)), math.log(sum(math.exp(x) for x in s))
        out.append(sum(math.exp(a - zt) * ((a - zt) - (b - zs)) for a, b in zip(t, s)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_kl_against_float64(dtype):
    g = torch.Generator().manual_seed(0)
    t, s = (3 * torch.randn(6, 50, generator=g)).to(dtype), (3 * torch.randn(6, 50, generator=g)).to(dtype)
    ref = _kl64(t, s)
    per_token = token_kl(log_probs(t), log_probs(s), reduction="none")
    assert per_token.dtype == torch.float32 and per_token.shape == (6,)
    torch.testing.assert_close(per_token.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_kl(log_probs(t), log_probs(s)).double(), ref.sum(), rtol=1e-5, atol=1e-5)
    assert float(token_kl(log_probs(t), log_probs(t))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        token_kl(log_probs(t), log_probs(s), reduction="mean")


def test_attention_layers():
    cfg = SimpleNamespace(layer_types=["attention", "mamba2", "mamba2", "attention", "attention"])
    assert attention_layers(cfg) == [0, 3, 4]
    assert attention_layers(SimpleNamespace(layer_types=["mamba2"])) == []
