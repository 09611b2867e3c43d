"""Distillation on one process (DeepSpeed ZeRO-3 engines over a gloo group of one), against: the plain-PyTorch
loop (which shares the trainer's losses, optimizer and schedule, so it checks the DeepSpeed plumbing; the
objective is checked by test_trainer_oracle.py), an uninterrupted run for a resumed one, the base model for
frozen weights, the engine for an exported model. The 2-rank, kill and multi-node cases are in test_distill_distributed.py and
test_multinode.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rad_ds.distill.checkpoint import NonFiniteError, latest_checkpoint
from tests.distill_helpers import (
    launcher,
    load_launcher,
    python,
    run,
    run_args,
    save_base,
    write_chat_jsonl,
    write_text_jsonl,
)

L = load_launcher("distill")



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    save_base(d, name="big", num_hidden_layers=6, intermediate_size=192, seed=3)
    report = {"model": "tiny", "num_hidden_layers": 4,
              "layers": [{"index": i, "type": "attention"} for i in range(4)],
              "selections": [{"k": 1, "layers": [2]}, {"k": 2, "layers": [1, 3]}]}
    (d / "report.json").write_text(json.dumps(report))
    return save_base(d), write_text_jsonl(d / "text.jsonl", n=48), write_chat_jsonl(d / "chat.jsonl", n=40), d


def _cfg(tmp_path, base, out, data=None, **settings):
    b, text, _, _ = base
    return L.make_config(run_args(tmp_path, b, data or text, out, **settings))


def _distill(cfg):
    from rad_ds.distill import distill

    return distill(cfg)


def _final_state(path):
    from rad_ds.models import RadHybridForCausalLM

    return RadHybridForCausalLM.from_pretrained(str(path)).state_dict()


CASES = {
    # KD (forward KL) + replaced-layer MSE, text data, only the new mixers train
    "kd_hidden": {},
    # JSD + CE + cosine hidden, chat data with prompt masking, MLPs of replaced layers open, 2 micro-batches,
    # weight decay (matrices only), temperature, activation checkpointing, teacher parameters offloaded
    "jsd_ce_accum": {"loss.kd": "jsd", "loss.ce_weight": 0.3, "loss.hidden": "cosine", "loss.temperature": 2.0,
                     "student.trainable": "mamba_mlp", "train.grad_accum": 2, "optim.weight_decay": 0.1,
                     "student.gradient_checkpointing": "true", "teacher.offload": "true", "data": "chat"},
    # layer-wise: replaced layers get the teacher's input, trained on their own output only
    "layerwise": {"loss.layerwise": "true", "loss.kd": "none", "loss.hidden_weight": 1.0, "optim.schedule": "linear"},
    # DistiLLM's skew KL with its mixture weight from the run config
    "skew_kl": {"loss.kd": "skew_kl", "loss.skew_alpha": 0.2, "loss.hidden_weight": 0.0},
    # a larger teacher (6 layers, wider MLP) sharing the tokenizer; reverse KL; layers from a diagnosis report
    "larger_teacher": {"teacher": "big", "loss.hidden_weight": 0.0, "loss.kd": "reverse_kl", "report": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_run_matches_plain_pytorch_loop(case, base, tmp_path):
    """ZeRO-3 engines (partitioned even for tiny weights) == the plain single-process PyTorch loop,
    step by step: loss terms, learning rate, gradient norm; and the same final weights."""
    from rad_ds.distill.reference import ReferenceDistiller

    settings = dict(CASES[case])
    data = base[2] if settings.pop("data", None) == "chat" else None
    if settings.pop("teacher", None):
        settings["teacher.path"] = str(base[3] / "big")
    if settings.pop("report", None):
        settings.update({"student.layers": "null", "student.report": str(base[3] / "report.json"), "student.k": 2})
    settings = {k.replace(".", "__"): v for k, v in settings.items()}
    result = _distill(_cfg(tmp_path, base, tmp_path / "out", data=data, steps=5, **settings))
    ref = ReferenceDistiller(_cfg(tmp_path, base, tmp_path / "ref", data=data, steps=5, **settings))
    ref_rows = ref.run()
    assert [r["step"] for r in result.losses] == [1, 2, 3, 4, 5]
    for got, want in zip(result.losses, ref_rows):
        for key in ("loss", "kd", "hidden", "ce", "grad_norm"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-7), (case, got["step"], key)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    final = _final_state(result.export)
    for name, p in ref.student.state_dict().items():
        torch.testing.assert_close(final[name], p, rtol=1e-4, atol=1e-6, msg=name)
    if case == "layerwise":  # KD is off: nothing but the hidden term is computed
        assert "kd" not in result.losses[0] and result.losses[0]["hidden"] > 0
    if case == "larger_teacher":  # the report's k=2 selection, recorded with its provenance
        state = json.loads((result.checkpoint / "rad_ds_state.json").read_text())
        assert state["replaced_layers"] == [1, 3] and state["selection"]["k"] == 2
        assert state["selection"]["report"].endswith("report.json") and state["teacher"].endswith("big")
        assert json.loads((result.export / "distill.json").read_text())["selection"]["k"] == 2


def test_resume_equals_uninterrupted_and_export(base, tmp_path):
    """6 steps straight == 3 steps + stop + --resume auto + 3 steps (losses to 1e-6, weights exactly);
    frozen weights come out bit-identical to the base; the export equals the engine and loads in
    plain transformers."""
    from transformers import AutoModelForCausalLM

    from rad_ds.models.conversion import load_model

    straight = _distill(_cfg(tmp_path, base, tmp_path / "straight", steps=6, checkpoint__every=2))
    out = tmp_path / "resumed"
    first = _distill(_cfg(tmp_path, base, out, steps=6, checkpoint__every=2, train__stop_after=3))
    assert [r["step"] for r in first.losses] == [1, 2, 3] and first.export is None
    assert latest_checkpoint(out / "checkpoints").name == "step_00000003"
    second = _distill(_cfg(tmp_path, base, out, steps=6, checkpoint__every=2, checkpoint__resume="auto"))
    assert second.start_step == 3 and [r["step"] for r in second.losses] == [4, 5, 6]
    for got, want in zip(first.losses + second.losses, straight.losses):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6, rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # the resumed run continued the file
    a, b = _final_state(straight.export), _final_state(second.export)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # frozen = everything but the mixers of layers 1, 2: bit-identical to the base model
    base_model, _ = load_model(base[0])
    base_sd = base_model.state_dict()
    trained = [k for k in a if k.startswith(("model.layers.1.mamba.", "model.layers.2.mamba."))]
    assert trained and all(not torch.equal(a[k], torch.zeros_like(a[k])) for k in trained)
    for k, v in base_sd.items():
        if k in a:
            assert torch.equal(a[k], v), k
    # the export: same logits as the engine, also through plain transformers (trust_remote_code)
    engine = second.engine
    engine.eval()
    ids = torch.randint(0, 250, (2, 40))
    with torch.no_grad():
        want = engine(ids, use_cache=False).logits
        exported = AutoModelForCausalLM.from_pretrained(str(second.export), trust_remote_code=True)
        got = exported.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert json.loads((second.export / "distill.json").read_text())["step"] == 6
    # keep=2: only the newest two complete checkpoints are left
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    # a finished run asked to resume has nothing to do
    again = _distill(_cfg(tmp_path, base, out, steps=6, checkpoint__resume="auto"))
    assert again.losses == [] and again.start_step == 6


def test_export_launcher_matches_in_run_export(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = _distill(_cfg(tmp_path, base, tmp_path / "run", steps=2, wandb="true"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # wandb logged offline, into the run dir
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    out = tmp_path / "exp"
    r = run([python(), launcher("export.py"), "--checkpoint", tmp_path / "run", "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _final_state(out), _final_state(result.export)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    from rad_ds.core.cli import run_cli

    exp = load_launcher("export")
    for args, message in [(["--checkpoint", tmp_path, "--out", tmp_path / "exp2"], "not a rad-ds checkpoint"),
                          (["--checkpoint", tmp_path / "run", "--out", out], "--overwrite")]:
        assert run_cli(exp.main, list(map(str, args))) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "exp2").exists()


def test_nan_loss_stops_without_saving_then_resumes(base, tmp_path):
    """The real `python launchers/distill.py` (one process): a NaN loss at step 4 stops the run (exit 3,
    one line) before the optimizer step; latest stays on step 2 with finite weights; resume finishes."""
    b, text, _, _ = base
    out = tmp_path / "nan"
    args = run_args(tmp_path, b, text, out, steps=5, checkpoint__every=2)
    r = run([python(), launcher("distill.py"), *args], RAD_DS_FAULT="nan@loss:step=4")
    assert r.returncode == 3, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 4: the loss is not finite") and "step_00000002" in last
    assert latest_checkpoint(out / "checkpoints").name == "step_00000002"
    assert not (out / "checkpoints" / "step_00000004").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    resumed = _distill(L.make_config(args + ["--resume", "auto"]))
    assert [x["step"] for x in resumed.losses] == [3, 4, 5]
    assert all(math.isfinite(x["loss"]) for x in resumed.losses)


def test_nan_in_process_raises(base, tmp_path, monkeypatch):
    monkeypatch.setenv("RAD_DS_FAULT", "nan@loss:step=1")
    with pytest.raises(NonFiniteError, match="step 1: the loss is not finite"):
        _distill(_cfg(tmp_path, base, tmp_path / "nan1", steps=2))
    assert not (tmp_path / "nan1" / "checkpoints").exists()


def _cli(args, capsys):
    rc = __import__("rad_ds.core.cli", fromlist=["run_cli"]).run_cli(L.main, list(map(str, args)))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def test_bad_input_one_line_errors_nothing_lost(base, tmp_path, capsys):
    b, text, chat, d = base
    good = run_args(tmp_path, b, text, tmp_path / "good", steps=2)

    def with_(*extra):  # argparse and the dotted overrides both let the last occurrence win
        return good + [str(x) for x in extra]

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)))  # EOS only: 1 token
    other_tok = save_base(tmp_path, name="other_tok")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(other_tok)
    t.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    t.save_pretrained(other_tok)
    big_vocab = save_base(tmp_path, name="big_vocab", vocab_size=384)
    cases = [
        (with_("--data", tmp_path / "missing.jsonl"), "missing.jsonl: file not found"),
        (with_("--data", broken), "broken.jsonl line 2: not valid JSON"),
        (with_("--data", empty), "no records"),
        (with_("--data", short), "no usable documents"),
        (with_("--train.global_batch=3"), "train.global_batch=3 is not a multiple of train.micro_batch=2"),
        (with_("--teacher", other_tok), "does not match the student's"),
        (with_("--teacher", big_vocab), "teacher vocab size 384 != student vocab size 320"),
        (with_("--resume", d), "not a rad-ds checkpoint"),
        (with_("--layers", "1,9"), "out of range"),
        (with_("--model", tmp_path / "no_such_model"), "no_such_model does not exist"),
        (with_("--loss.kd=kl"), "loss.kd = 'kl'"),
        (with_("--data.seq_len=8192"), "packed sequences but one step needs a global batch of 2"),
    ]
    for args, message in cases:
        rc, line = _cli(args, capsys)
        assert rc == 2 and line.startswith("error:") and message in line, (message, line)
        assert not (tmp_path / "good").exists(), message  # a failed start leaves no --out behind

    # a checkpoint of another layer selection, or of another model, is refused and left as it was
    run_dir = tmp_path / "kept"
    _distill(L.make_config(run_args(tmp_path, b, text, run_dir, steps=2)))
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    for args, message in [
        (run_args(tmp_path, b, text, run_dir, steps=4) + ["--resume", "auto", "--layers", "1,3"],
         "was made with replaced layers [1, 2], this run has [1, 3]"),
        (run_args(tmp_path, save_base(tmp_path, name="other", seed=7), text, run_dir, steps=4) + ["--resume", "auto"],
         "was made with base model weights"),
        (run_args(tmp_path, b, chat, run_dir, steps=4) + ["--resume", "auto"], "was trained on other data"),
        (run_args(tmp_path, b, text, run_dir, steps=4), "already holds checkpoint step_00000002; pass --resume auto"),
    ]:
        rc, line = _cli(args, capsys)
        assert rc == 2 and message in line, (message, line)
        after = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
        assert after == before
    # an interrupted save is not a checkpoint
    (run_dir / "checkpoints" / "step_00000009").mkdir()
    rc, line = _cli(with_("--resume", run_dir / "checkpoints" / "step_00000009"), capsys)
    assert rc == 2 and "incomplete" in line


def test_invalid_launch_exits_nonzero_with_one_line(base, tmp_path):
    """The real launcher as a subprocess: a usage error is one line and exit code 2; nothing is written."""
    b, text, _, _ = base
    out = tmp_path / "o"
    r = run([python(), launcher("distill.py"), *run_args(tmp_path, b, text, out), "--loss.temprature=2"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: command line: unknown setting 'loss.temprature'; did you mean loss.temperature?")
    assert not out.exists()


def test_a_run_in_this_process_leaves_no_launcher_variables(base, tmp_path):
    """A world of one sets RANK, MASTER_PORT, ... for DeepSpeed; afterwards they must be gone, or every
    subprocess started later (a launcher, lm-eval, a pipeline stage) would think it is rank 0 of a job."""
    import os

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    _distill(_cfg(tmp_path, base, tmp_path / "env", steps=1))
    assert {k: os.environ.get(k) for k in keys} == before
