"""The trainer against a shared-nothing oracle (tests/trainer_oracle.py), and direct tests of the pieces the
plain-loop comparison of test_distill.py cannot check because it shares them with the trainer: the loss
normalisation, the AdamW parameter groups and the learning-rate schedule.

The trainer runs in float32 only (``model.dtype`` has no float64), the oracle in float64. A parameter after
a step then differs by its float32 rounding (up to 2.4e-7 at |p| ~ 6, dt_bias) plus float32 gradient noise
amplified by Adam: where a clipped gradient g is near ``eps`` the first update lr g / (|g| + eps) moves
with g at a rate up to lr / eps. With the default eps 1e-8 one element of out_proj (clipped gradient 5e-9)
ends 1.4e-5 away; with eps 1e-6 every parameter stays within 4e-7 of the oracle, so the run uses eps 1e-6.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.distill_helpers import load_launcher, run_args, save_base, write_text_jsonl
from tests.trainer_oracle import OracleSettings, TrainerOracle, decays, lr_multiplier, objective, text_masks

LAYERS = [1, 2]
TOL = 1e-6
# KD (forward KL at T=2) + replaced-layer MSE + CE, weight decay with both groups non-empty, clipping active
# (global norms ~0.59 and ~0.54), 3 warm-up steps of 10 (steps 1 and 2 at 1/3 and 2/3 of the peak)
SETTINGS = OracleSettings(lr=3e-3, total_steps=10, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1,
                          betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, grad_clip=0.1, temperature=2.0,
                          kd_weight=1.0, hidden_weight=0.5, ce_weight=0.3)


def _run_settings(s: OracleSettings, placement: str) -> dict:
    """The same settings as run-config overrides (micro-batch 2 x grad_accum 2: one global batch of 4 rows)."""
    return {"train__stop_after": 2, "train__grad_accum": 2, "checkpoint__every": 1, "checkpoint__keep": 2,
            "optim__lr": s.lr, "optim__warmup_steps": s.warmup_steps,
            "optim__schedule": s.schedule, "optim__min_lr_ratio": s.min_lr_ratio,
            "optim__betas": f"{s.betas[0]},{s.betas[1]}", "optim__eps": s.eps, "optim__weight_decay": s.weight_decay,
            "optim__grad_clip": s.grad_clip, "loss__kd": "forward_kl", "loss__temperature": s.temperature,
            "loss__kd_weight": s.kd_weight, "loss__hidden": "mse", "loss__hidden_weight": s.hidden_weight,
            "loss__ce_weight": s.ce_weight, "student__trainable": "mamba", "student__init": "attention",
            "teacher__location": placement}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle")
    # documents of at most 7 words (<= 56 bytes + EOS) fit a 64-token row whole: none is split
    return save_base(d), write_text_jsonl(d / "text.jsonl", n=48, max_words=7)


def _trainer_steps(tmp_path, tiny, placement, monkeypatch):
    """Two steps of the real trainer (one process, ZeRO-3): its metrics rows, its trainable parameters after
    each step (DeepSpeed's own zero_to_fp32 of the step's checkpoint) and the global batch each step's
    student forwards received (recorded on the engine, before any of the trainer's loss code)."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rad_ds.distill import distill

    calls = []
    forward = deepspeed.DeepSpeedEngine.forward

    def recording_forward(self, *args, **kwargs):
        calls.append((args[0].detach().clone(), kwargs["position_ids"].detach().clone()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "forward", recording_forward)
    base, data = tiny
    out = tmp_path / f"run_{placement}"
    args = run_args(tmp_path, base, data, out, steps=SETTINGS.total_steps, **_run_settings(SETTINGS, placement))
    cfg = load_launcher("distill").make_config(args)
    result = distill(cfg)
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "forward", forward)
    assert result.summary["teacher_location"] == result.summary["teacher_placement"] == placement
    assert [r["step"] for r in result.losses] == [1, 2] and len(calls) == 4  # 2 steps x 2 micro-batches
    states = {}
    for step in (1, 2):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step_{step:08d}",
                                                      exclude_frozen_parameters=True)
        states[step] = {n.removeprefix("student."): v.double() for n, v in sd.items()}  # one-copy: "student."
    batches = [tuple(torch.cat([calls[2 * k + a][i] for a in (0, 1)]) for i in (0, 1)) for k in (0, 1)]
    return result.losses, states, batches


def _oracle(base, settings=SETTINGS, **kw) -> TrainerOracle:
    """The oracle's own student (the base with surgery at LAYERS, the published init) and teacher (the base)."""
    from rad_ds.models.conversion import load_model
    from rad_ds.surgery.replace import replace_attention

    teacher, _ = load_model(base)
    student, _ = load_model(base)
    replace_attention(student, LAYERS, init="attention", seed=0)
    trainable = [n for n, _ in student.named_parameters() if any(n.startswith(f"model.layers.{i}.mamba.")
                                                                  for i in LAYERS)]
    return TrainerOracle(student, teacher, trainable, LAYERS, settings, **kw)


def _run_oracle(oracle, batches, pad_id, masks=text_masks):
    rows, states = [], []
    for ids, pos in batches:
        target, token = masks(ids, pos, pad_id)
        rows.append(oracle.step(ids, pos, target, token))
        states.append(oracle.state())
    return rows, states


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


@pytest.mark.parametrize("placement", ["shared", "replicated"])
def test_trainer_equals_shared_nothing_oracle(placement, tiny, tmp_path, monkeypatch):
    """Steps 1 and 2 of the trainer == the oracle: every trainable parameter to 1e-6, the logged loss terms,
    gradient norm and learning rate. ``shared``: the default one-copy self-distillation engine; ``replicated``:
    a separate frozen teacher model."""
    from transformers import AutoTokenizer

    rows, trained, batches = _trainer_steps(tmp_path, tiny, placement, monkeypatch)
    pad_id = AutoTokenizer.from_pretrained(tiny[0]).pad_token_id
    oracle = _oracle(tiny[0])
    init = oracle.state()
    assert sorted(trained[1]) == sorted(init)  # exactly the mixers of the replaced layers train
    groups = {decays(p) for p in oracle.params.values()}
    assert groups == {True, False}  # both AdamW groups non-empty
    want, states = _run_oracle(oracle, batches, pad_id)

    # the data is what the test means it to be: packed documents, padding, counted positions fewer than tokens
    ids, pos = batches[0]
    assert (pos[:, 1:] == 0).any() and (ids == pad_id).any() and want[0]["n_target"] < want[0]["n_token"]
    tokens = 0
    for step, (got, ref, state) in enumerate(zip(rows, want, states), start=1):
        tokens += ref["n_token"]
        assert got["tokens"] == tokens, step  # the trainer's count of real tokens = the definition's
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12), step
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), step
        for key in ("loss", "kd", "hidden", "ce"):
            assert got[key] == pytest.approx(ref[key], rel=2e-5), (step, key)
        diff = {n: float((trained[step][n] - state[n]).abs().max()) for n in state}
        worst = max(diff, key=diff.get)
        assert diff[worst] <= TOL, (step, worst, diff[worst])
        # not vacuous: every tensor moved by far more than the tolerance
        assert all(float((state[n] - init[n]).abs().max()) > 100 * TOL for n in state), step
    assert want[0]["lr"] != want[1]["lr"]  # warm-up: two different learning rates
    assert want[0]["grad_norm"] > SETTINGS.grad_clip and want[1]["grad_norm"] > SETTINGS.grad_clip  # clipped

    if placement != "shared":
        return
    # the comparison can fail: an oracle that is wrong in one respect misses the trainer by > 10x the tolerance
    wrong = {
        "decay on every tensor": dict(decay_rule=lambda p: True),
        "decay on no tensor": dict(decay_rule=lambda p: False),
        "no warm-up": dict(settings=_replace(warmup_steps=0)),
        "no clipping": dict(settings=_replace(grad_clip=0.0)),
        "temperature 1": dict(settings=_replace(temperature=1.0)),
        # the diagram's "hidden_weight x sum of replaced-layer losses" read literally (the trainer averages them)
        "hidden losses summed over the layers": dict(settings=_replace(hidden_weight=2 * SETTINGS.hidden_weight)),
        "logit losses also across document boundaries": dict(masks=_boundary_blind_masks),
    }
    for what, kw in wrong.items():
        masks = kw.pop("masks", text_masks)
        _, bad = _run_oracle(_oracle(tiny[0], **kw), batches, pad_id, masks)
        assert _max_diff(trained[2], bad[1]) > 10 * TOL, what


def _boundary_blind_masks(ids, pos, pad_id):
    """A wrong data definition: a document's last position predicts the next document's first token."""
    target, token = text_masks(ids, pos, pad_id)
    target[:, :-1] = token[:, :-1] & token[:, 1:]
    return target, token


def _replace(**kw) -> OracleSettings:
    import dataclasses

    return dataclasses.replace(SETTINGS, **kw)


# -- the schedule ----------------------------------------------------------------------------------------

def test_lr_factor_is_warmup_then_cosine_in_closed_form():
    """``lr_factor`` (0-based) = the closed form (1-based) at every step, and at hand-computed points: warm-up
    s/W, the peak, mid-cosine, the floor at the last step and beyond; also the scheduler the engine gets."""
    from rad_ds.distill.optim import build_scheduler, lr_factor

    for total, warmup, schedule, floor in [(11, 2, "cosine", 0.1), (10, 0, "cosine", 0.0), (10, 3, "linear", 0.2),
                                           (7, 3, "constant", 0.1), (50, 5, "cosine", 0.05), (1, 0, "cosine", 0.1)]:
        # past the last step the floor holds (a run of one post-warm-up step has no decay to extend)
        for s in range(1, total + (4 if total > warmup + 1 else 1)):
            assert lr_factor(s - 1, total, warmup, schedule, floor) == pytest.approx(
                lr_multiplier(s, total, warmup, schedule, floor), abs=1e-12), (total, warmup, schedule, s)
    # 11 steps, 2 of warm-up, cosine to 0.1 from step 3 (1.0) to step 11 (0.1): step 7 is half-way
    for s, want in [(1, 0.5), (2, 1.0), (3, 1.0), (5, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2), (7, 0.55),
                    (11, 0.1), (14, 0.1)]:
        assert lr_factor(s - 1, 11, 2, "cosine", 0.1) == pytest.approx(want, abs=1e-12), s
    # the wiring: the learning rate an optimizer step s applies is lr x the closed form of s
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, SimpleNamespace(warmup_steps=3, schedule="cosine", min_lr_ratio=0.1), 10)
    for s in range(1, 13):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_multiplier(s, 10, 3, "cosine", 0.1), abs=1e-12), s
        opt.step()
        sched.step()


# -- the parameter groups --------------------------------------------------------------------------------

def _tiny_student():
    from rad_ds.models.conversion import from_hf_model
    from rad_ds.surgery.replace import replace_attention
    from tests.model_factories import tiny_hf_model

    model = from_hf_model(tiny_hf_model("llama"))
    replace_attention(model, LAYERS, init="attention", seed=0)
    return model


def _group_names(model, groups) -> list[tuple[set, float]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [({name_of[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups]


MIXER_MATRICES = ("in_proj.weight", "conv1d.weight", "out_proj.weight")
MIXER_VECTORS = ("dt_bias", "A_log", "D", "conv1d.bias", "norm.weight")


def test_param_groups_decay_exactly_the_matrices():
    """Trainable tensors of >= 2 dimensions decay, vectors do not, frozen ones are in no group; exact names."""
    from rad_ds.distill.optim import param_groups, set_trainable

    model = _tiny_student()
    set_trainable(model, "mamba", LAYERS)
    (decay, wd), (no_decay, wd0) = _group_names(model, param_groups(model, 0.1))
    assert (wd, wd0) == (0.1, 0.0)
    assert decay == {f"model.layers.{i}.mamba.{w}" for i in LAYERS for w in MIXER_MATRICES}
    assert no_decay == {f"model.layers.{i}.mamba.{w}" for i in LAYERS for w in MIXER_VECTORS}

    set_trainable(model, "all", LAYERS)
    (decay, _), (no_decay, _) = _group_names(model, param_groups(model, 0.1))
    attn = [f"model.layers.{i}.self_attn.{w}_proj.weight" for i in (0, 3) for w in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{w}_proj.weight" for i in range(4) for w in ("gate", "up", "down")]
    mixer = [f"model.layers.{i}.mamba.{w}" for i in LAYERS for w in MIXER_MATRICES]
    assert decay == {"model.embed_tokens.weight", *attn, *mlp, *mixer}  # lm_head is tied to the embedding
    norms = [f"model.layers.{i}.{w}_layernorm.weight" for i in range(4) for w in ("input", "post_attention")]
    assert no_decay == {"model.norm.weight", *norms, *(f"model.layers.{i}.mamba.{w}" for i in LAYERS
                                                        for w in MIXER_VECTORS)}
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert all((dict(model.named_parameters())[n].ndim >= 2) == (n in decay) for n in decay | no_decay)

    # only vectors train: one group, without decay; a ZeRO-3 partition (stored flat) decays by its full shape
    set_trainable(model, "mamba", LAYERS)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".D"))
    assert [(len(g["params"]), g["weight_decay"]) for g in param_groups(model, 0.1)] == [(2, 0.0)]
    flat = torch.nn.Module()
    flat.w, flat.b = torch.nn.Parameter(torch.zeros(12)), torch.nn.Parameter(torch.zeros(3))
    flat.w.ds_shape, flat.b.ds_shape = torch.Size([3, 4]), torch.Size([3])
    (decay, _), (no_decay, _) = _group_names(flat, param_groups(flat, 0.1))
    assert (decay, no_decay) == ({"w"}, {"b"})


# -- the loss normalisation ------------------------------------------------------------------------------

def _loss_inputs(dtype=torch.float64, seed=0):
    """Two rows of 6 positions: row 0 a document of 4 tokens and one of 2 (4 counted positions, 6 tokens),
    row 1 a document of 2 tokens, one of 1 and padding (1 counted position, 3 tokens); vocab 7, hidden 5,
    outputs of two replaced layers."""
    g = torch.Generator().manual_seed(seed)
    pad = 6
    ids = torch.tensor([[1, 2, 3, 0, 4, 5], [3, 1, 0, pad, pad, pad]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 2, 3]])
    target, token = text_masks(ids, pos, pad)
    assert target.sum(1).tolist() == [4, 1] and token.sum(1).tolist() == [6, 3]
    s_logits = torch.randn(2, 6, 7, generator=g, dtype=dtype) * 2
    t_logits = torch.randn(2, 6, 7, generator=g, dtype=dtype) * 2
    s_hid = [torch.randn(2, 6, 5, generator=g, dtype=dtype) for _ in range(2)]
    t_hid = [torch.randn(2, 6, 5, generator=g, dtype=dtype) for _ in range(2)]
    return ids, target, token, s_logits, t_logits, s_hid, t_hid


def _trainer_loss(inputs, rows, n_target, n_token, settings=SETTINGS):
    """The trainer's LossComputer on ``rows`` of the inputs, normalised by the given (global) counts."""
    from rad_ds.distill.config import LossConfig
    from rad_ds.distill.run import LossComputer

    ids, target, token, s_logits, t_logits, s_hid, t_hid = inputs
    cfg = LossConfig(kd="forward_kl", temperature=settings.temperature, kd_weight=settings.kd_weight, hidden="mse",
                     hidden_weight=settings.hidden_weight, ce_weight=settings.ce_weight, chunk_tokens=3)
    lc = LossComputer(cfg, [1, 3], None)
    mb = SimpleNamespace(input_ids=ids[rows], target=target[rows], token=token[rows])
    sums = lc.sums(s_logits[rows], t_logits[rows], mb, {1: s_hid[0][rows], 3: s_hid[1][rows]},
                   {1: t_hid[0][rows], 3: t_hid[1][rows]})
    return lc.weighted(sums, n_target, n_token)


def test_loss_normalisation_is_the_global_per_token_mean():
    """LossComputer == the float64 definition (KD and CE: per counted position; hidden: per real token and
    replaced layer; over the whole global batch), loss and gradient; two micro-batches with their own counts
    add up to it (a mean of per-micro-batch means would not); uncounted positions change nothing."""
    inputs = _loss_inputs()
    ids, target, token, s_logits, t_logits, s_hid, t_hid = inputs
    leaves = [s_logits, *s_hid]
    for x in leaves:
        x.requires_grad_(True)
    n_target, n_token = int(target.sum()), int(token.sum())
    want, want_terms = objective(s_logits, t_logits, s_hid, t_hid, ids, target, token, SETTINGS)
    want_grads = torch.autograd.grad(want, leaves)

    got, terms = _trainer_loss(inputs, slice(None), n_target, n_token)
    for k in ("kd", "hidden", "ce"):
        assert float(terms[k]) == pytest.approx(float(want_terms[k]), rel=1e-6), k  # hidden: float32 inside
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    got_grads = torch.autograd.grad(got, leaves)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-9)

    # one row per micro-batch, each normalised by the global counts: the same loss and gradient
    parts = [_trainer_loss(inputs, [r], n_target, n_token)[0] for r in (0, 1)]
    assert float(sum(parts)) == pytest.approx(float(want), rel=1e-6)
    for g, w in zip(torch.autograd.grad(sum(parts), leaves), want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-9)
    # ... where averaging each micro-batch by its own counts would weigh row 1's single position 4x
    own = [_trainer_loss(inputs, [r], int(target[r].sum()), int(token[r].sum()))[0] for r in (0, 1)]
    assert abs(float(sum(own)) / 2 - float(want)) > 1e-3

    # padding and uncounted positions: any values there give the same loss and no gradient
    with torch.no_grad():
        s2, t2 = s_logits.detach().clone(), t_logits.clone()
        s2[~target] += 5 * torch.randn_like(s2[~target])
        t2[~target] -= 3
        h2 = [h.detach().clone() for h in s_hid]
        for h in h2:
            h[~token] = 100.0
        ids2 = ids.clone()
        ids2[~token] = 0
    moved = (ids2, target, token, s2, t2, h2, t_hid)
    assert float(_trainer_loss(moved, slice(None), n_target, n_token)[0]) == pytest.approx(float(got), rel=1e-12)
    assert float(objective(s2, t2, h2, t_hid, ids2, target, token, SETTINGS)[0]) == pytest.approx(float(want),
                                                                                                   rel=1e-12)
    g_logits, *g_hid = got_grads
    assert float(g_logits[~target].abs().max()) == 0.0
    assert all(float(g[~token].abs().max()) == 0.0 for g in g_hid)


def test_the_oracle_shares_nothing_with_the_trainer():
    """tests/trainer_oracle.py imports no trainer or data-pipeline code (only torch and the standard library;
    the model classes reach it as objects)."""
    tree = ast.parse(Path(__file__).with_name("trainer_oracle.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "math", "dataclasses", "torch"}, imported
