"""Distillation losses against direct computations from their definitions (float64, explicit sums)."""

from __future__ import annotations

import math

import pytest
import torch

from rad_ds.distill.losses import (
    KD_KINDS,
    ce_loss_sum,
    ce_loss_sum_ref,
    hidden_loss_sum,
    kd_loss_sum,
    kd_loss_sum_ref,
    mean_kd_loss,
    token_divergence,
)


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
    elif kind == "skew_kl":  # DistiLLM: KL(T || a T + (1-a) S)
        d = _kl(pt, beta * pt + (1 - beta) * ps)
    elif kind == "skew_rkl":  # KL(S || a S + (1-a) T)
        d = _kl(ps, beta * ps + (1 - beta) * pt)
    elif kind == "tv":
        d = 0.5 * (ps - pt).abs().sum(-1)
    elif kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    else:
        raise ValueError(f"no definition of {kind!r} here: add it beside the others")
    return d * temperature**2


@pytest.mark.parametrize("kind", KD_KINDS)
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


def test_skew_kl_stays_bounded_where_kl_explodes_and_tv_is_a_distance():
    """A teacher token the student gives (nearly) no mass: KL grows without bound, skew KL is at most
    log(1/alpha) (DistiLLM's argument); TV lies in [0, 1] and is symmetric."""
    t = torch.tensor([[0.0, 0.0, -60.0]])
    s = torch.tensor([[0.0, -80.0, 0.0]])  # the teacher's second token is all but impossible for the student
    kl = token_divergence(s, t, "forward_kl")
    skew = token_divergence(s, t, "skew_kl", beta=0.1)
    assert kl.item() > 30 and skew.item() <= math.log(1 / 0.1) + 1e-6
    rskew = token_divergence(t, s, "skew_rkl", beta=0.1)  # the same situation seen from the student's side
    assert rskew.item() <= math.log(1 / 0.1) + 1e-6
    a, b = token_divergence(s, t, "tv"), token_divergence(t, s, "tv")
    torch.testing.assert_close(a, b)
    assert 0 <= a.item() <= 1


@pytest.mark.parametrize("kind", KD_KINDS)
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
    for kind in KD_KINDS:
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


@pytest.mark.parametrize("kind", KD_KINDS)
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


# -- the chunked autograd functions against plain, unchunked references ----------------------------------
#
# The reference is the divergence/cross-entropy from its definition in float64 over the whole (b, l, V)
# tensor at once, differentiated by autograd; the chunked functions must give the same loss and gradient
# for every kind, temperature and chunk size (1, a size that does not divide the selection, and one larger
# than it). Tolerances: float64 logits are computed in float64, float32 in float32; bf16 logits are
# computed in float32 too, so only the bf16 gradient's rounding (8 bits of mantissa) loosens the check.

CHUNKS = (1, 5, 1_000_000)
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 1e-6},
       torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5}}  # loss; bf16 grads are checked below with 2**-7
BETA = 0.3


def _logits(dtype, shape=(3, 11, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    mask = torch.rand(shape[:2], generator=g) > 0.3
    return s, t, mask


def _kd_reference(s, t, mask, kind, temperature):
    """Unchunked float64 loss and gradient w.r.t. ``s`` (from the definitions in ``_reference``)."""
    s64 = s.detach().double().requires_grad_()
    loss = _reference(s64, t.double(), kind, temperature, BETA)[mask].sum()
    loss.backward()
    return loss.detach(), s64.grad


def _check_grad(got, ref, dtype):
    assert got.dtype == dtype
    if dtype == torch.bfloat16:  # one bf16 rounding of each gradient entry
        torch.testing.assert_close(got.double(), ref, rtol=2**-7, atol=ref.abs().max().item() * 2**-9)
    else:
        torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_kd_equals_unchunked_reference(kind, temperature, dtype):
    s, t, mask = _logits(dtype)
    ref_loss, ref_grad = _kd_reference(s, t, mask, kind, temperature)
    for chunk in CHUNKS:
        x = s.clone().requires_grad_()
        teacher = t.clone().requires_grad_()  # must get no gradient all the same
        loss = kd_loss_sum(x, teacher, mask, kind, temperature, BETA, chunk_tokens=chunk)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
        _check_grad(x.grad, ref_grad, dtype)
        assert teacher.grad is None
        assert x.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_kd_equals_the_plain_autograd_path(kind):
    """Same numbers as autograd through ``token_divergence`` chunk by chunk (the previous implementation)."""
    s, t, mask = _logits(torch.float32, seed=7)
    for temperature in (1.0, 1.7):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        new = kd_loss_sum(a, t, mask, kind, temperature, BETA, chunk_tokens=4)
        old = kd_loss_sum_ref(b, t, mask, kind, temperature, BETA, chunk_tokens=4)
        new.backward()
        old.backward()
        assert new.dtype == old.dtype == torch.float32
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
        # float32 rounding: the two paths round log-probabilities of magnitude ~20 differently (ulp 2e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=2e-6)


def _ce_reference(logits, ids, mask):
    x = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(x[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(logp * mask[:, :-1]).sum()
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_ce_equals_unchunked_reference(dtype):
    s, _, mask = _logits(dtype)
    ids = torch.randint(0, s.size(-1), s.shape[:2], generator=torch.Generator().manual_seed(3))
    ref_loss, ref_grad = _ce_reference(s, ids, mask)
    for chunk in CHUNKS:
        x = s.clone().requires_grad_()
        loss = ce_loss_sum(x, ids, mask, chunk)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
        _check_grad(x.grad, ref_grad, dtype)
        assert x.grad[:, -1].abs().max() == 0  # the last position has no target
    a, b = s.float().clone().requires_grad_(), s.float().clone().requires_grad_()
    new, old = ce_loss_sum(a, ids, mask, 4), ce_loss_sum_ref(b, ids, mask, 4)
    new.backward()
    old.backward()
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_mask_gives_zero_and_zero_gradient(dtype):
    s, t, _ = _logits(dtype, shape=(2, 4, 16))
    none = torch.zeros(2, 4, dtype=torch.bool)
    ids = torch.randint(0, 16, (2, 4))
    for kind in KD_KINDS:
        for loss_fn in (lambda x, k=kind: kd_loss_sum(x, t, none, k, 2.0, BETA), lambda x: ce_loss_sum(x, ids, none)):
            x = s.clone().requires_grad_()
            loss = loss_fn(x)
            loss.backward()
            assert loss.item() == 0.0 and not torch.isnan(loss)
            assert x.grad.dtype == dtype and torch.equal(x.grad, torch.zeros_like(x))
    only_last = torch.zeros(2, 4, dtype=torch.bool)
    only_last[:, -1] = True  # selects positions, but none with a target
    x = s.clone().requires_grad_()
    ce_loss_sum(x, ids, only_last).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck_tiny(kind):
    s, t, mask = _logits(torch.float64, shape=(2, 3, 6), seed=11)
    ids = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda x: kd_loss_sum(x, t, mask, kind, 1.7, BETA, chunk_tokens=2),
                                    (s.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: ce_loss_sum(x, ids, mask, 2), (s.clone().requires_grad_(),))


def _saved_numel(fn, *inputs):
    """Elements of the tensors that autograd saved for backward, not counting the ``inputs`` themselves."""
    ptrs = {x.untyped_storage().data_ptr() for x in inputs}
    extra = []

    def pack(x):
        if x.untyped_storage().data_ptr() not in ptrs:
            extra.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(extra)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_forward_keeps_no_chunk_activations(kind):
    """What survives the forward: the inputs plus O(tokens) floats; the reference keeps its log-softmaxes."""
    s, t, mask = _logits(torch.float32, shape=(2, 16, 64))
    s.requires_grad_()
    n = int(mask.sum())
    new = _saved_numel(lambda: kd_loss_sum(s, t, mask, kind, 2.0, BETA, chunk_tokens=4), s, t)
    assert new <= 4 * n  # row indices, two logsumexps and one row constant per selected token
    old = _saved_numel(lambda: kd_loss_sum_ref(s, t, mask, kind, 2.0, BETA, chunk_tokens=4), s, t)
    assert old >= 2 * n * 64  # student and teacher log-softmax of every chunk
    ids = torch.randint(0, 64, (2, 16))
    assert _saved_numel(lambda: ce_loss_sum(s, ids, mask, 4), s) <= 3 * n


def test_vocab_slice_and_bad_mask():
    """The trainer passes ``logits[..., :vocab_limit]`` (a strided view): same result as a copy, and no
    gradient for the cut columns."""
    s, t, mask = _logits(torch.float32, shape=(2, 6, 40))
    ids = torch.randint(0, 32, (2, 6))
    full = s.clone().requires_grad_()
    cut = s[..., :32].clone().requires_grad_()
    a = kd_loss_sum(full[..., :32], t[..., :32], mask, "jsd", 1.5, BETA, 3) + ce_loss_sum(full[..., :32], ids, mask, 3)
    b = kd_loss_sum(cut, t[..., :32].clone(), mask, "jsd", 1.5, BETA, 3) + ce_loss_sum(cut, ids, mask, 3)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(full.grad[..., :32], cut.grad)
    assert full.grad[..., 32:].abs().max() == 0
    with pytest.raises(ValueError, match="does not match logits"):
        kd_loss_sum(s, t, mask[:, :5])
    with pytest.raises(ValueError, match="beta"):
        kd_loss_sum(s, t, mask, "jsd", beta=1.0)


def test_ce_ignore_index_as_before():
    """A target of -100 is skipped, as by ``F.cross_entropy`` (the previous implementation)."""
    s, _, mask = _logits(torch.float32, shape=(2, 7, 20))
    ids = torch.randint(0, 20, (2, 7))
    ids[0, 3] = ids[1, 1] = -100
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    new, old = ce_loss_sum(a, ids, mask, 3), ce_loss_sum_ref(b, ids, mask, 3)
    new.backward()
    old.backward()
    torch.testing.assert_close(new, old)
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[0, 2].abs().max() == 0 and a.grad[1, 0].abs().max() == 0


@pytest.mark.parametrize("kind, key", [("jsd", "jsd_beta"), ("skew_kl", "skew_alpha"), ("skew_rkl", "skew_alpha")])
def test_the_run_config_mixture_weight_reaches_the_loss(kind, key):
    from types import SimpleNamespace

    from rad_ds.distill.config import LossConfig
    from rad_ds.distill.run import LossComputer

    s, t, mask = _logits(torch.float32, seed=3)
    cfg = LossConfig(kd=kind, hidden_weight=0.0, **{key: 0.27})
    mb = SimpleNamespace(target=mask, token=mask)
    got = LossComputer(cfg, [], None).sums(s, t, mb, None, None)["kd"]
    torch.testing.assert_close(got, kd_loss_sum(s, t, mask, kind, cfg.temperature, 0.27))
    assert not torch.allclose(got, kd_loss_sum(s, t, mask, kind, cfg.temperature, 0.5))


# -- sparse teacher targets (top-k + tail bucket) ---------------------------------------------------------

def _bucket_reference(s, t, kind, temperature, k):
    """The (k+1)-bucket divergence written out with explicit float64 probabilities."""
    ps, pt = _probs(s, temperature), _probs(t, temperature)
    idx = pt.topk(k, dim=-1).indices
    ps_b = torch.cat([ps.gather(-1, idx), (1 - ps.gather(-1, idx).sum(-1, keepdim=True)).clamp(min=0)], -1)
    pt_b = torch.cat([pt.gather(-1, idx), (1 - pt.gather(-1, idx).sum(-1, keepdim=True)).clamp(min=0)], -1)
    if kind == "forward_kl":
        d = (pt_b * (pt_b.log() - ps_b.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (ps_b * (ps_b.log() - pt_b.log())).sum(-1)
    elif kind == "tv":
        d = 0.5 * (ps_b - pt_b).abs().sum(-1)
    else:
        raise ValueError(kind)
    return d * temperature**2


@pytest.mark.parametrize("kind", KD_KINDS)
def test_sparse_kd_with_k_equal_to_vocab_is_the_dense_loss(kind):
    from rad_ds.distill.losses import sparse_kd_loss_sum
    from rad_ds.engine.topk import teacher_topk

    s, t, mask = _logits(torch.float64, shape=(2, 5, 24), seed=5)
    idx, top, tail = teacher_topk(t, 24, 1.7)
    assert torch.isinf(tail).all()
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    sparse = sparse_kd_loss_sum(a, idx, top, tail, mask, kind, 1.7, BETA, chunk_tokens=3)
    dense = kd_loss_sum(b, t, mask, kind, 1.7, BETA)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tv"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_sparse_kd_with_small_k_is_the_bucket_divergence(kind, k):
    from rad_ds.distill.losses import sparse_kd_loss_sum
    from rad_ds.engine.topk import teacher_topk

    s, t, mask = _logits(torch.float64, shape=(2, 6, 32), seed=6)
    idx, top, tail = teacher_topk(t, k, 2.0)
    ref_s = s.clone().requires_grad_()
    ref = _bucket_reference(ref_s, t, kind, 2.0, k)[mask].sum()
    ref.backward()
    for chunk in CHUNKS:
        x = s.clone().requires_grad_()
        got = sparse_kd_loss_sum(x, idx, top, tail, mask, kind, 2.0, chunk_tokens=chunk)
        got.backward()
        torch.testing.assert_close(got, ref.detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x.grad, ref_s.grad, rtol=1e-8, atol=1e-11)
        assert x.grad[~mask].abs().max() == 0


def test_sparse_reverse_kl_stays_finite_where_the_top_k_teacher_has_no_mass():
    """The student's favourite token is outside the teacher's top-k (the teacher gives it almost nothing):
    renormalised top-k reverse KL would be infinite; with the tail bucket loss and gradient stay finite."""
    from rad_ds.distill.losses import sparse_kd_loss_sum
    from rad_ds.engine.topk import teacher_topk

    t = torch.full((1, 1, 16), -50.0)
    t[..., :4] = torch.tensor([2.0, 1.0, 0.5, 0.0])
    s = torch.zeros(1, 1, 16)
    s[..., 10] = 12.0  # nearly all the student's mass on a token the teacher's top 4 do not contain
    idx, top, tail = teacher_topk(t, 4)
    x = s.clone().requires_grad_()
    loss = sparse_kd_loss_sum(x, idx, top, tail, torch.ones(1, 1, dtype=torch.bool), "reverse_kl")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10 and torch.isfinite(x.grad).all()
