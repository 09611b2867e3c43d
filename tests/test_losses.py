"""Distillation losses against direct computations from their definitions (float64, explicit sums)."""

from __future__ import annotations

import math

import pytest
import torch

from rad_ds.distill.losses import ce_loss_sum, hidden_loss_sum, kd_loss_sum, mean_kd_loss, token_divergence


def _probs(logits, t):
    return torch.softmax(logits.double() / t, dim=-1)


def _kl(p, q):  # sum_v p log(p/q), per position, float64
    return (p * (p.log() - q.log())).sum(-1)


def _reference(s, t, kind, temperature, beta):
    ps, pt = _probs(s, temperature), _probs(t, temperature)
    if kind == "forward_kl":
        d = _kl(pt, ps)
    elif kind == "reverse_kl":
        d = _kl(ps, pt)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    return d * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergences_match_definitions(kind, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 50) * 3, torch.randn(3, 7, 50) * 3
    mask = torch.rand(3, 7) > 0.3
    ref = _reference(s, t, kind, temperature, 0.3)
    got = token_divergence(s, t, kind, temperature, beta=0.3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    total = kd_loss_sum(s, t, mask, kind, temperature, beta=0.3)
    torch.testing.assert_close(total.double(), ref[mask].sum(), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()  # divergences are non-negative


def test_jsd_is_symmetric_at_half_and_bounded():
    torch.manual_seed(1)
    s, t = torch.randn(4, 30) * 5, torch.randn(4, 30) * 5
    a = token_divergence(s, t, "jsd", beta=0.5)
    b = token_divergence(t, s, "jsd", beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (a <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_logits_give_zero(kind):
    x = torch.randn(2, 5, 40) * 4
    assert kd_loss_sum(x, x.clone(), torch.ones(2, 5, dtype=torch.bool), kind).abs().item() < 1e-5


def test_temperature_squared_factor():
    """For small differences KL ~ (1/2T^2) * var-like term, so T^2 keeps the loss scale comparable;
    exact check: the factor multiplies the divergence of the tempered distributions."""
    s, t = torch.randn(6, 20), torch.randn(6, 20)
    raw = _kl(_probs(t, 3.0), _probs(s, 3.0))
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", 3.0).double(), raw * 9.0, rtol=1e-5, atol=1e-7)


def test_masking_everything_gives_zero_not_nan_and_zero_grad():
    s = torch.randn(2, 4, 16, requires_grad=True)
    t = torch.randn(2, 4, 16)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        v = kd_loss_sum(s, t, none, kind)
        assert v.item() == 0.0 and not torch.isnan(v)
    m = mean_kd_loss(s, t, none)
    assert m.item() == 0.0
    m.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert ce_loss_sum(s, torch.randint(0, 16, (2, 4)), none).item() == 0.0
    h = torch.randn(2, 4, 8)
    h[0, 0] = float("nan")  # a NaN at a masked (padding) position must not leak into the sum
    assert hidden_loss_sum(h, torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_values_and_grads(kind):
    torch.manual_seed(2)
    t = torch.randn(3, 33, 64)
    mask = torch.rand(3, 33) > 0.2
    grads, vals = [], []
    for chunk in (1_000_000, 7, 1):
        s = (torch.randn(3, 33, 64, generator=torch.Generator().manual_seed(5))).requires_grad_()
        v = kd_loss_sum(s, t, mask, kind, 1.7, 0.4, chunk_tokens=chunk)
        v.backward()
        vals.append(v.detach())
        grads.append(s.grad)
    for v, g in zip(vals[1:], grads[1:]):
        torch.testing.assert_close(v, vals[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=1e-8)
    assert grads[0][~mask].abs().max() == 0  # masked positions get no gradient


def test_cross_entropy_matches_shifted_reference():
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 30)
    ids = torch.randint(0, 30, (2, 9))
    mask = torch.rand(2, 9) > 0.3
    ref = 0.0
    for b in range(2):
        for i in range(8):  # position i predicts token i+1; the last position has no target
            if mask[b, i]:
                ref += -torch.log_softmax(logits[b, i].double(), -1)[ids[b, i + 1]]
    for chunk in (1000, 3):
        torch.testing.assert_close(ce_loss_sum(logits, ids, mask, chunk).double(), torch.as_tensor(ref),
                                   rtol=1e-5, atol=1e-6)


def test_hidden_losses_match_definitions():
    torch.manual_seed(4)
    s, t = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    mse = sum(((s[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(6) if mask[b, i])
    cos = sum(1 - torch.dot(s[b, i], t[b, i]) / (s[b, i].norm() * t[b, i].norm())
              for b in range(2) for i in range(6) if mask[b, i])
    torch.testing.assert_close(hidden_loss_sum(s, t, mask, "mse"), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_loss_sum(s, t, mask, "cosine"), cos, rtol=1e-5, atol=1e-6)
    assert hidden_loss_sum(t, t, mask, "mse").item() == 0
    assert abs(hidden_loss_sum(t, 3 * t, mask, "cosine").item()) < 1e-5


def test_teacher_gets_no_gradient_and_shape_mismatch_is_refused():
    s = torch.randn(1, 3, 10, requires_grad=True)
    t = torch.randn(1, 3, 10, requires_grad=True)
    kd_loss_sum(s, t, torch.ones(1, 3, dtype=torch.bool)).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="vocab sizes must match"):
        kd_loss_sum(torch.randn(1, 3, 10), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown KD loss"):
        token_divergence(s, s, "kl")
