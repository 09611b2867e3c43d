"""The KD divergence registry (rad_ds/distill/divergences/): each divergence's in-place ``rows`` / ``grad_rows``
against autograd of its own ``reference`` (float64), each ``reference`` against the formula written out here
from probabilities, the vocabulary-split contract a sharded caller relies on, the bucket form, parameter and
name errors, and a divergence registered at run time that then works through every loss path and the run
config without editing any other file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rad_ds.distill.config import ConfigError, LossConfig, DistillConfig
from rad_ds.distill.divergences import REGISTRY, Divergence, get, register, resolve, unregister
from rad_ds.distill.fused import fused_loss_sums, fused_loss_sums_ref
from rad_ds.distill.losses import KD_KINDS, kd_loss_sum, kd_loss_sum_ref, sparse_kd_loss_sum
from rad_ds.engine.topk import teacher_topk

ROOT = Path(__file__).resolve().parents[1]
F64 = {"rtol": 1e-10, "atol": 1e-12}
PARAM = 0.3  # every parameter of the built-ins (JSD's beta, skew's alpha) set away from its default


def _div(name: str) -> Divergence:
    return get(name, **{k: PARAM for k in REGISTRY[name].defaults})


def _logp(n=5, v=37, seed=0, scale=3.0):
    """Two float64 log-softmaxes ``(n, v)`` and the student logits they come from (v odd: an uneven split)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return z, torch.log_softmax(z, -1), torch.log_softmax(zt, -1)


def _definition(name, p, q, a=PARAM):
    """The divergence from its formula, on probabilities (float64); independent of the package's code."""
    def kl(x, y):
        return (x * (x.log() - y.log())).sum(-1)

    return {
        "forward_kl": lambda: kl(q, p),
        "reverse_kl": lambda: kl(p, q),
        "jsd": lambda: a * kl(q, a * q + (1 - a) * p) + (1 - a) * kl(p, a * q + (1 - a) * p),
        "skew_kl": lambda: kl(q, a * q + (1 - a) * p),
        "skew_rkl": lambda: kl(p, a * p + (1 - a) * q),
        "tv": lambda: 0.5 * (p - q).abs().sum(-1),
        "alpha_div": lambda: (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a)),
    }[name]()


@pytest.mark.parametrize("name", KD_KINDS)
def test_reference_matches_the_definition(name):
    _, s, t = _logp()
    torch.testing.assert_close(_div(name).reference(s, t), _definition(name, s.exp(), t.exp()), **F64)


@pytest.mark.parametrize("name", KD_KINDS)
def test_rows_and_grad_rows_match_autograd_of_the_reference(name):
    div = _div(name)
    z, s, t = _logp(seed=1)
    ref = div.reference(s, t)
    (grad,) = torch.autograd.grad(ref.sum(), z)
    s, t = s.detach(), t.detach()
    d, c = div.rows(s.clone(), t.clone())  # may be consumed in place: give copies
    assert d.shape == c.shape == (5, 1)
    torch.testing.assert_close(d.squeeze(-1), ref.detach(), **F64)
    torch.testing.assert_close(div.grad_rows(s.clone(), t.clone(), c), grad, **F64)
    # the generic path from ``elementwise`` (what a new divergence gets for free) agrees too
    d_gen, c_gen = Divergence.rows(div, s.clone(), t.clone())
    torch.testing.assert_close(d_gen, d, **F64)
    torch.testing.assert_close(Divergence.grad_rows(div, s.clone(), t.clone(), c_gen), grad, **F64)


@pytest.mark.parametrize("name", KD_KINDS)
def test_contract_sums_over_a_split_vocabulary(name):
    """``d`` and ``c`` are sums over the vocabulary and ``grad_rows`` is elementwise given ``c``: two halves of
    the globally normalised log-probabilities give the whole once ``d`` and ``c`` are summed (an all-reduce)."""
    div = _div(name)
    _, s, t = _logp(seed=2)
    s, t = s.detach(), t.detach()
    d, c = div.rows(s.clone(), t.clone())
    grad = div.grad_rows(s.clone(), t.clone(), c)
    h = s.size(-1) // 2
    halves = [(s[:, :h].clone(), t[:, :h].clone()), (s[:, h:].clone(), t[:, h:].clone())]
    parts = [div.rows(a.clone(), b.clone()) for a, b in halves]
    torch.testing.assert_close(parts[0][0] + parts[1][0], d, **F64)
    c_sum = parts[0][1] + parts[1][1]
    torch.testing.assert_close(c_sum, c, **F64)
    torch.testing.assert_close(torch.cat([div.grad_rows(a, b, c_sum) for a, b in halves], -1), grad, **F64)


@pytest.mark.parametrize("name", KD_KINDS)
def test_bucket_form(name):
    """Without empty buckets the bucket form is the reference; a bucket neither side has (-inf in both, the tail
    when k = vocab) adds nothing, and the gradient stays finite. The elementwise default does the same."""
    div = _div(name)
    _, s, t = _logp(seed=3)
    torch.testing.assert_close(div.bucket(s, t), div.reference(s, t), **F64)
    inf = torch.full((s.size(0), 1), float("-inf"), dtype=s.dtype)
    x = s.detach().clone().requires_grad_()
    with_tail = div.bucket(torch.cat([x, inf], -1), torch.cat([t, inf], -1))
    torch.testing.assert_close(with_tail, div.reference(s, t), **F64)
    (g,) = torch.autograd.grad(with_tail.sum(), x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(Divergence.bucket(div, torch.cat([s, inf], -1), torch.cat([t, inf], -1)),
                               div.reference(s, t), **F64)


def test_names_and_parameters_fail_in_one_line():
    errors = []
    for call, match in [
        (lambda: get("kl"), "unknown KD loss 'kl'; use one of forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tv"),
        (lambda: get("jsd", beta=1.0), r"jsd mixture weight beta=1.0 must be in \(0, 1\)"),
        (lambda: get("skew_rkl", alpha=0.0), r"skew_rkl skew alpha=0.0 must be in \(0, 1\)"),
        (lambda: get("forward_kl", beta=0.3), "'forward_kl' got unknown parameter.* beta; it takes no parameters"),
        (lambda: get("jsd", alpha=0.3), "'jsd' got unknown parameter.* alpha; it takes beta"),
        (lambda: get("jsd", beta="x"), "'jsd': beta='x' is not a number"),
        (lambda: register(type("Twin", (Divergence,), {"name": "jsd"})), "'jsd' is already registered"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            call()
        errors.append(str(e.value))
    assert all("\n" not in m for m in errors)


def test_resolve_keeps_the_legacy_beta_argument():
    """The losses' ``beta`` argument sets JSD's beta and skew's alpha by name, means nothing to the others,
    and a Divergence object carries its own parameters."""
    assert resolve("jsd", 0.2).beta == 0.2 and resolve("skew_kl", 0.2).alpha == 0.2
    assert resolve("skew_rkl").alpha == 0.1 and resolve("jsd").beta == 0.5
    assert resolve("forward_kl", 0.2).params == {}
    obj = get("jsd", beta=0.7)
    assert resolve(obj, 0.2) is obj


def test_the_run_config_builds_the_divergence():
    assert LossConfig(kd="jsd", jsd_beta=0.27).divergence().beta == 0.27
    assert LossConfig(kd="skew_rkl", skew_alpha=0.2).divergence().alpha == 0.2
    assert LossConfig(kd="jsd", jsd_beta=0.27, kd_params={"beta": "0.4"}).divergence().beta == 0.4
    assert LossConfig(kd="none").divergence() is None
    with pytest.raises(ConfigError, match=r"loss.kd = 'jsd' with loss.kd_params = .*beta=2.0 must be in \(0, 1\)"):
        LossConfig(kd="jsd", kd_params={"beta": "2"}).divergence()
    with pytest.raises(ConfigError, match="'tv' got unknown parameter"):
        _run_config(loss__kd="tv", loss__kd_params="beta=0.3").validate()


# -- a divergence added at run time: one class and one register() call, no other file edited -----------------

class AlphaDivergence(Divergence):
    """Amari's alpha-divergence, 1/(a(1-a)) sum (a p + (1-a) q - p^a q^(1-a)); a = 1/2 is 4x squared Hellinger.
    Only ``elementwise`` is written: rows, grad_rows, bucket and reference come from the base class."""

    name = "alpha_div"
    defaults = {"alpha": 0.5}

    def check(self):
        self._in_unit_interval("alpha", "order")

    def elementwise(self, s, t):
        a = self.alpha
        return (a * s.exp() + (1 - a) * t.exp() - (a * s + (1 - a) * t).exp()) / (a * (1 - a))


@pytest.fixture
def alpha_div():
    register(AlphaDivergence)
    yield get("alpha_div", alpha=PARAM)
    unregister("alpha_div")


def _run_config(**over) -> DistillConfig:
    cfg = DistillConfig()
    cfg.out, cfg.data.path, cfg.student.layers = "runs/x", str(ROOT / "rad_ds" / "data" / "demo_chat.jsonl"), [1]
    for k, v in over.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def test_a_registered_divergence_works_in_the_chunked_loss(alpha_div):
    _, s, t = _logp(seed=4)
    torch.testing.assert_close(alpha_div.reference(s, t), _definition("alpha_div", s.exp(), t.exp()), **F64)
    g = torch.Generator().manual_seed(4)
    logits, t_logits = (torch.randn(3, 4, 29, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    mask = torch.rand(3, 4, generator=g) > 0.3
    # the object (alpha 0.3), or the name (its default alpha 0.5)
    for kind, a in ((alpha_div, PARAM), ("alpha_div", 0.5)):
        ref_x = logits.clone().requires_grad_()
        p, q = torch.softmax(ref_x / 1.5, -1), torch.softmax(t_logits / 1.5, -1)
        ref = (_definition("alpha_div", p, q, a) * 1.5**2)[mask].sum()
        ref.backward()
        x = logits.clone().requires_grad_()
        got = kd_loss_sum(x, t_logits, mask, kind, 1.5, chunk_tokens=5)
        got.backward()
        torch.testing.assert_close(got, ref.detach(), **F64)
        torch.testing.assert_close(x.grad, ref_x.grad, **F64)
        old = kd_loss_sum_ref(logits.float(), t_logits.float(), mask, kind, 1.5, chunk_tokens=5)
        torch.testing.assert_close(old.double(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_a_registered_divergence_works_in_the_fused_and_sparse_losses(alpha_div):
    g = torch.Generator().manual_seed(5)
    s_h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    s_w = torch.randn(31, 8, generator=g, dtype=torch.float64).requires_grad_()
    t_h, t_w = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(31, 8, generator=g,
                                                                                     dtype=torch.float64)
    mask = torch.rand(2, 6, generator=g) > 0.3
    got = fused_loss_sums(s_h, s_w, t_h, t_w, mask, None, alpha_div, 2.0, chunk_tokens=4)["kd"]
    want = fused_loss_sums_ref(s_h, s_w, t_h, t_w, mask, None, alpha_div, 2.0, chunk_tokens=4)["kd"]
    torch.testing.assert_close(got, want, **F64)
    for a, b in zip(torch.autograd.grad(got, (s_h, s_w)), torch.autograd.grad(want, (s_h, s_w))):
        torch.testing.assert_close(a, b, **F64)
    logits, t_logits = torch.nn.functional.linear(s_h, s_w).detach(), torch.nn.functional.linear(t_h, t_w)
    idx, top, tail = teacher_topk(t_logits, 31, 2.0)  # k = vocab: the sparse loss is the dense one
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    sparse = sparse_kd_loss_sum(a, idx, top, tail, mask, alpha_div, 2.0, chunk_tokens=3)
    dense = kd_loss_sum(b, t_logits, mask, alpha_div, 2.0)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse, dense, **F64)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_a_registered_divergence_is_a_run_config_choice(alpha_div):
    cfg = _run_config(loss__kd="alpha_div", loss__kd_params="alpha=0.3")
    cfg.validate()
    assert cfg.loss.divergence().alpha == 0.3
    with pytest.raises(ConfigError, match=r"alpha_div order alpha=1.5 must be in \(0, 1\)"):
        _run_config(loss__kd="alpha_div", loss__kd_params="alpha=1.5").validate()


def test_an_unregistered_name_is_not_a_run_config_choice():
    with pytest.raises(ConfigError, match="loss.kd = 'alpha_div': use one of forward_kl, .*, tv, none"):
        _run_config(loss__kd="alpha_div").validate()
