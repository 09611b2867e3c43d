"""The recovery recipe: an initialisation that starts at the skipped sublayer, and the two-stage run (layer-wise
alignment, then logit KD end to end) with its hand-over, against oracles: the base with the same attention
sublayers skipped (``skip_layers``), the stage-1 checkpoint evaluated by hand on the next step's batch, an
uninterrupted run for one resumed across the boundary, the two-engine path for the one-copy teacher, and the
online teacher for a second stage read from a cache."""

from __future__ import annotations

import pytest
import torch

from tests.distill_helpers import load_launcher, metrics, run_args, save_base, write_text_jsonl

L = load_launcher("distill")
N1 = 3  # stage-1 steps of the runs below (6 in all)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    return d, save_base(d), write_text_jsonl(d / "text.jsonl", n=48)


def _cfg(tmp_path, base, out, **settings):
    d, b, data = base
    # the published mapping: stage 1 has a whole layer output to learn (attention_skip starts near it)
    s = {"loss.stage1_steps": N1, "loss.hidden": "mse", "loss.hidden_weight": 0, "student.init": "attention",
         **settings}
    return L.make_config(run_args(tmp_path, b, data, out, steps=6, **s))


def _distill(cfg):
    from rad_ds.distill import distill

    return distill(cfg)


def test_attention_skip_init_starts_as_the_skipped_sublayer(base):
    """init=attention_skip: the student's logits equal the base's with those attention sublayers skipped."""
    from rad_ds.models.conversion import load_model
    from rad_ds.surgery import replace_attention

    d, b, _ = base
    model, _ = load_model(b)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        skipped = model(ids, skip_layers={1, 2}).logits
        full = model(ids).logits
    replace_attention(model, [1, 2], init="attention_skip", seed=0)
    with torch.no_grad():
        student = model(ids).logits
    torch.testing.assert_close(student, skipped, rtol=1e-5, atol=1e-5)
    assert (student - full).abs().max() > 1e-2  # the skipped sublayers did matter
    mixer = model.model.layers[1].mamba
    assert float(mixer.out_proj.weight.abs().max()) == 0 and float(mixer.in_proj.weight.abs().max()) > 0


def test_two_stage_hand_over(base, tmp_path):
    """Steps 1..N1 train on the layer outputs alone (fed the teacher's inputs), later steps on the logits; the
    first KD step starts from the stage-1 weights: its logged KD equals the KD of the step-N1 checkpoint's
    exported student on that step's batch, computed here with plain models."""
    from rad_ds.data import DistillLoader, build_packed
    from rad_ds.distill.export import export_checkpoint
    from rad_ds.distill.losses import kd_loss_sum_ref
    from rad_ds.models.conversion import load_model

    d, b, data = base
    cfg = _cfg(tmp_path, base, tmp_path / "run", **{"checkpoint.every": N1, "checkpoint.keep": 5})
    res = _distill(cfg)
    rows = res.losses
    assert [r["stage"] for r in rows] == [1] * N1 + [2] * (6 - N1)
    assert all("hidden" in r and "kd" not in r for r in rows[:N1])
    assert all("kd" in r and "hidden" not in r for r in rows[N1:])
    assert rows[N1 - 1]["hidden"] < rows[0]["hidden"]  # stage 1 learns its objective

    export_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{N1:08d}", tmp_path / "stage1")
    student, tok = load_model(tmp_path / "stage1")
    teacher, _ = load_model(b)
    loader = DistillLoader(build_packed(cfg.data, tok), 2, 1, 0, 1, cfg.train.seed, True)
    for _ in range(N1):
        loader.next_step()
    batch = loader.next_step()
    mb = batch.micro[0]
    with torch.no_grad():
        t = teacher(mb.input_ids, position_ids=mb.position_ids).logits
        s = student(mb.input_ids, position_ids=mb.position_ids).logits
    want = float(kd_loss_sum_ref(s, t, mb.target)) / batch.n_target
    assert rows[N1]["kd"] == pytest.approx(want, rel=1e-5)


def test_resume_across_the_boundary_and_two_engines(base, tmp_path):
    """Stopped one step before the boundary and resumed = uninterrupted; the two-engine path (taps feeding the
    teacher's inputs in stage 1 only) = the one-copy path, step by step."""
    straight = _distill(_cfg(tmp_path, base, tmp_path / "straight")).losses
    _distill(_cfg(tmp_path, base, tmp_path / "resumed", **{"train.stop_after": N1 - 1, "checkpoint.every": 1}))
    _distill(_cfg(tmp_path, base, tmp_path / "resumed", **{"checkpoint.resume": "auto", "checkpoint.every": 1}))
    resumed = metrics(tmp_path / "resumed")
    two = _distill(_cfg(tmp_path, base, tmp_path / "two", **{"teacher.location": "zero3"})).losses
    for a, r, t in zip(straight, resumed, two, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert r[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
            assert t[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_second_stage_from_a_cache(base, tmp_path):
    """Stage 1 on the one-copy teacher stream, stage 2 on a k = vocab float32 cache: the same run as with the
    teacher online throughout (round-off only)."""
    from tests.test_teacher_cache import _build

    d, b, data = base
    _build(b, data, tmp_path / "cache", k=10_000, values_dtype="float32")
    online = _distill(_cfg(tmp_path, base, tmp_path / "online")).losses
    cached = _distill(_cfg(tmp_path, base, tmp_path / "cached", **{"teacher.cache": tmp_path / "cache"}))
    assert cached.summary["teacher_location"] == "shared"
    for a, c in zip(online, cached.losses, strict=True):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]


def test_recipe_errors(base, tmp_path):
    from rad_ds.distill.config import ConfigError

    with pytest.raises(ConfigError, match="loss.hidden"):
        _cfg(tmp_path, base, tmp_path / "x", **{"loss.hidden": "none"}).validate()
    with pytest.raises(ConfigError, match="no end-to-end steps"):
        _cfg(tmp_path, base, tmp_path / "x", **{"loss.stage1_steps": 6}).validate()
    with pytest.raises(ConfigError, match="student.init"):
        _cfg(tmp_path, base, tmp_path / "x", **{"student.init": "skip"}).validate()
