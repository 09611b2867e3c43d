"""The fused LM head + loss (rad_ds/distill/fused.py) against the logits path: float64 losses and gradients of
the student's hidden states and head weight for every divergence and CE, temperatures 1 and 2, partial masks,
tied and untied heads; nothing of size tokens x vocab saved or produced; the teacher cache's chunked top-k;
and the trainer with loss.fused on == off in every teacher location."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rad_ds.distill.fused import fused_loss_sums, fused_loss_sums_ref
from rad_ds.distill.losses import KD_KINDS
from rad_ds.engine.topk import fused_teacher_topk, teacher_topk

B, L, H, V = 2, 9, 8, 67  # V prime, so no (tokens x vocab) tensor has another tensor's size by chance
BETA = 0.3


def _inputs(tied: bool, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(B, L, H, generator=g, dtype=dtype).requires_grad_()
    s_w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    t_h = torch.randn(B, L, H, generator=g, dtype=dtype)
    t_w = s_w if tied else torch.randn(V, H, generator=g, dtype=dtype)
    mask = torch.rand(B, L, generator=g) > 0.35
    mask[0, -1] = True  # a selected last position: KD counts it, CE has no target there
    ids = torch.randint(0, V, (B, L), generator=g)
    return s_h, s_w, t_h, t_w, mask, ids


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", [*KD_KINDS, None])
def test_fused_equals_logits_path_float64(kind, temperature, tied):
    s_h, s_w, t_h, t_w, mask, ids = _inputs(tied)
    got = fused_loss_sums(s_h, s_w, t_h, t_w, mask, ids, kind, temperature, BETA, chunk_tokens=4)
    want = fused_loss_sums_ref(s_h, s_w, t_h, t_w, mask, ids, kind, temperature, BETA, chunk_tokens=4)
    assert sorted(got) == sorted(want) == sorted(["ce"] + (["kd"] if kind else []))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got[k], (s_h, s_w), retain_graph=True)
        g_want = torch.autograd.grad(want[k], (s_h, s_w), retain_graph=True)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # both terms in one backward, weighted as the trainer weighs them
    w = {"kd": 0.7, "ce": 1.3}
    g_got = torch.autograd.grad(sum(w[k] * v for k, v in got.items()), (s_h, s_w))
    g_want = torch.autograd.grad(sum(w[k] * v for k, v in want.items()), (s_h, s_w))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_teacher_side_gets_no_gradient_and_frozen_head_none():
    s_h, s_w, t_h, t_w, mask, ids = _inputs(False)
    t_h.requires_grad_()
    t_w.requires_grad_()
    out = fused_loss_sums(s_h, s_w, t_h, t_w, mask, None, "jsd", 2.0, BETA)
    assert out["kd"].requires_grad
    gs = torch.autograd.grad(out["kd"], (t_h, t_w), allow_unused=True)
    assert gs == (None, None)
    # a frozen student head: gradients reach the hidden states only
    frozen = s_w.detach()
    out = fused_loss_sums(s_h, frozen, t_h, t_w, mask, ids, "forward_kl")
    (g,) = torch.autograd.grad(out["kd"] + out["ce"], (s_h,))
    ref = fused_loss_sums_ref(s_h, frozen, t_h, t_w, mask, ids, "forward_kl")
    (r,) = torch.autograd.grad(ref["kd"] + ref["ce"], (s_h,))
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_empty_mask_and_float32():
    s_h, s_w, t_h, t_w, mask, ids = _inputs(False, dtype=torch.float32)
    none = torch.zeros_like(mask)
    out = fused_loss_sums(s_h, s_w, t_h, t_w, none, ids, "reverse_kl")
    assert out["kd"].item() == 0 and out["ce"].item() == 0
    gh, gw = torch.autograd.grad(out["kd"] + out["ce"], (s_h, s_w))
    assert not gh.any() and not gw.any()
    got = fused_loss_sums(s_h, s_w, t_h, t_w, mask, ids, "skew_rkl", 2.0, BETA)
    want = fused_loss_sums_ref(s_h, s_w, t_h, t_w, mask, ids, "skew_rkl", 2.0, BETA)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=1e-6)


def test_bad_shapes_are_refused():
    s_h, s_w, t_h, t_w, mask, ids = _inputs(False)
    with pytest.raises(ValueError, match="vocab sizes must match"):
        fused_loss_sums(s_h, s_w, t_h, t_w[:-1], mask, None, "forward_kl")
    with pytest.raises(ValueError, match="mask"):
        fused_loss_sums(s_h, s_w, t_h, t_w, mask[:, :-1], None, "forward_kl")
    with pytest.raises(ValueError, match="teacher"):
        fused_loss_sums(s_h, s_w, None, None, mask, None, "forward_kl")


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def _saved(fn, *inputs):
    """Shapes autograd saved for backward, not counting ``inputs`` themselves."""
    ptrs = {x.untyped_storage().data_ptr() for x in inputs}
    shapes = []

    def pack(x):
        if x.untyped_storage().data_ptr() not in ptrs:
            shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("kind", KD_KINDS)
def test_nothing_of_tokens_by_vocab_is_saved_or_produced(kind):
    s_h, s_w, t_h, t_w, mask, ids = _inputs(False, dtype=torch.float32)
    n, chunk = B * L, 4
    out, shapes = _saved(lambda: fused_loss_sums(s_h, s_w, t_h, t_w, mask, ids, kind, 2.0, BETA, chunk), s_h, s_w)
    # saved: the gradients of the hidden states (n x H) and of the head (V x H), one per term; no logits
    assert sorted(shapes) == sorted([(n, H)] * 2 + [(V, H)] * 2), shapes
    with _LargestTensor() as mode:
        out = fused_loss_sums(s_h, s_w, t_h, t_w, mask, ids, kind, 2.0, BETA, chunk)
        (out["kd"] + out["ce"]).backward()
    assert mode.largest <= max(chunk * V, V * H, n * H)  # a chunk's logits at most
    with _LargestTensor() as mode:
        ref = fused_loss_sums_ref(s_h, s_w, t_h, t_w, mask, ids, kind, 2.0, BETA, chunk)
        (ref["kd"] + ref["ce"]).backward()
    assert mode.largest >= n * V  # the logits path: whole logits and their gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_teacher_topk_equals_the_logits_topk(temperature):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(11, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    for k in (1, 5, V):
        got = fused_teacher_topk(h, w, k, temperature, chunk_tokens=3)
        want = teacher_topk(h @ w.T, k, temperature)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    empty = fused_teacher_topk(h[:0], w, 5, temperature, chunk_tokens=3)
    assert [tuple(x.shape) for x in empty] == [(0, 5), (0, 5), (0,)]


# -- the trainer: fused on == off ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.distill_helpers import save_base, write_text_jsonl

    d = tmp_path_factory.mktemp("fused")
    save_base(d, name="big", num_hidden_layers=5, intermediate_size=160, seed=3)
    return d, save_base(d, num_hidden_layers=4), write_text_jsonl(d / "text.jsonl", n=24)


PLACEMENTS = {
    # one-copy self-distillation: the teacher stream inside the student engine; JSD + CE at T=2
    "shared": ["--teacher.location=shared", "--loss.kd=jsd", "--loss.ce_weight=0.3", "--loss.temperature=2"],
    # a separate ZeRO-3 teacher engine (a larger teacher, so no replaced-layer loss): reverse KL
    "zero3": ["--teacher.location=zero3", "--loss.kd=reverse_kl", "--teacher.path={big}",
              "--loss.hidden_weight=0"],
    # a whole teacher on the rank (the base), the student's MLPs training too; skew KL + CE + hidden MSE
    "replicated": ["--teacher.location=replicated", "--loss.kd=skew_kl", "--loss.ce_weight=0.5",
                   "--student.trainable=mamba_mlp"],
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_trainer_fused_equals_logits_path(base, tmp_path, placement):
    from rad_ds.distill import distill
    from tests.distill_helpers import run_args
    from tests.test_distill import L, _final_state

    d, b, text = base
    extra = [a.format(big=d / "big") for a in PLACEMENTS[placement]]

    def run(name, fused):
        args = run_args(d, b, text, tmp_path / name, steps=3) + extra + [f"--loss.fused={fused}"]
        return distill(L.make_config(args))

    on, off = run("on", "true"), run("off", "false")
    assert on.summary["teacher_location"] == placement
    for got, want in zip(on.losses, off.losses, strict=True):
        for key in ("loss", "kd", "hidden", "ce", "grad_norm"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (placement, got["step"], key)
    a, b_ = _final_state(on.export), _final_state(off.export)
    assert sorted(a) == sorted(b_)
    for k in a:
        # fp32 summation-order rounding, which Adam's g / sqrt(v) amplifies on near-zero gradient entries: 1e-5
        # is 0.1% of three steps' updates at lr 3e-3 (the loss terms and gradient norms above agree to 1e-6)
        torch.testing.assert_close(a[k], b_[k], rtol=1e-4, atol=1e-5, msg=k)


def test_where_fused_cannot_serve(base, tmp_path):
    """A trainable ZeRO-3-partitioned head: loss.fused=true is refused naming the fix, auto takes the logits
    path; a bad value, and loss.fused=true with a teacher cache, are refused by the config."""
    from rad_ds.distill import distill
    from rad_ds.distill.config import ConfigError
    from tests.distill_helpers import run_args
    from tests.test_distill import L

    d, b, text = base
    args = run_args(d, b, text, tmp_path / "x", steps=1) + ["--student.trainable=all"]
    with pytest.raises(ConfigError, match="loss.fused=true: the LM head trains and is ZeRO-3-partitioned"):
        distill(L.make_config(args + ["--loss.fused=true"]))
    auto = distill(L.make_config(run_args(d, b, text, tmp_path / "auto", steps=1) + ["--student.trainable=all"]))
    assert auto.losses[0]["kd"] > 0
    with pytest.raises(ConfigError, match="loss.fused"):
        L.make_config(args + ["--loss.fused=maybe"]).validate()
    with pytest.raises(ConfigError, match="loss.fused=true: a teacher cache's top-k targets take the logits path"):
        L.make_config(args + ["--loss.fused=true", f"--teacher.cache={tmp_path / 'cache'}"]).validate()


@pytest.mark.parametrize("family", ["llama", "llama3"])  # tied and untied heads
def test_teacher_cache_topk_from_hidden_states(family):
    """The cache writer's top-k, now projected chunk by chunk from the final hidden states, equals the top-k of
    the teacher's full logits at the counted positions."""
    from types import SimpleNamespace

    import numpy as np

    from rad_ds.teacher_cache import run as cache_run
    from tests.model_factories import tiny_hf_model

    model = tiny_hf_model(family, seed=2).eval()
    g = np.random.default_rng(0)
    ids = g.integers(0, model.config.vocab_size, (3, 12))
    pos = np.tile(np.arange(12), (3, 1))
    target = g.random((3, 12)) > 0.4
    build = object.__new__(cache_run._CacheBuild)
    build.packed = SimpleNamespace(input_ids=ids, position_ids=pos, target=target)
    build.teacher = model
    build.cfg = SimpleNamespace(teacher=SimpleNamespace(location="replicated"), temperature=2.0)
    build.store = SimpleNamespace(k=7)
    old = cache_run.TOPK_CHUNK_TOKENS
    cache_run.TOPK_CHUNK_TOKENS = 4  # several chunks
    try:
        counts, idx, top, tail = build._topk(np.arange(3))
    finally:
        cache_run.TOPK_CHUNK_TOKENS = old
    with torch.no_grad():
        logits = model(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).logits
    w_idx, w_top, w_tail = teacher_topk(logits[torch.from_numpy(target)], 7, 2.0)
    assert counts.tolist() == target.sum(-1).tolist()
    assert torch.equal(idx, w_idx)
    torch.testing.assert_close(top, w_top.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tail, w_tail.float(), rtol=1e-5, atol=1e-6)
