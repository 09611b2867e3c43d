"""Run configs: shipped files load and validate, overrides parse by type, errors name the field and fix,
batch sizes derive from the world size, DeepSpeed "auto" values are filled and checked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rad_ds.distill.config import ConfigError, DistillConfig, field_help, parse_overrides
from rad_ds.engine.engines import BatchPlan, fill_ds_config, load_ds_config, plan_batch

ROOT = Path(__file__).resolve().parents[1]
def _is_run_config(path: Path) -> bool:
    """configs/ also holds pipeline configs (launchers/rad.py, tested with the pipeline): a run config's
    top-level keys are all sections or fields of DistillConfig."""
    import yaml

    keys = set(yaml.safe_load(path.read_text()) or {})
    return keys <= {f.name for f in dataclasses.fields(DistillConfig)}


CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if _is_run_config(p)]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def _valid(**over) -> DistillConfig:
    cfg = DistillConfig()
    cfg.out, cfg.data.path, cfg.student.layers = "runs/x", str(ROOT / "rad_ds" / "data" / "demo_chat.jsonl"), [1]
    for k, v in over.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_run_configs_load_and_validate(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped paths (ds_configs/, rad_ds/data/) resolve from anywhere
    cfg = DistillConfig.load(path)
    cfg.out = str(tmp_path / "out")
    cfg.validate()
    assert Path(cfg.deepspeed).is_file() and Path(cfg.data.path).is_file()
    again = DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
@pytest.mark.parametrize("world", [1, 2])
def test_shipped_deepspeed_configs_fill(path, world):
    raw = load_ds_config(path)
    plan = plan_batch(_valid(train__micro_batch=2, train__global_batch=8).train, world)
    filled = fill_ds_config(raw, plan, "float32", str(path), grad_clip=1.0)
    assert filled["train_batch_size"] == 8 and filled["train_micro_batch_size_per_gpu"] == 2
    assert filled["gradient_accumulation_steps"] == 8 // (2 * world)
    assert "auto" not in json.dumps(filled)
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    assert raw == load_ds_config(path)  # the loaded dict was not modified
    if "zero3" in path.name:
        assert filled["zero_optimization"]["stage"] == 3


def test_overrides_parse_by_type():
    cfg = DistillConfig().apply_overrides([
        "--train.steps=7", "--student.layers", "3,5-6", "--loss.layerwise", "--optim.betas=[0.8, 0.9]",
        "--teacher.path", "null", "--loss.temperature=2", "--data.max-documents=10", "--wandb=false",
    ])
    assert cfg.train.steps == 7 and cfg.student.layers == [3, 5, 6] and cfg.loss.layerwise is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.teacher.path is None and cfg.loss.temperature == 2.0
    assert cfg.data.max_documents == 10 and cfg.wandb.enabled is False
    assert parse_overrides(["--a.b", "--c.d=1"]) == [("a.b", "true"), ("c.d", "1")]


@pytest.mark.parametrize("args, message", [
    (["--train.stepz=3"], "unknown setting 'train.stepz'; did you mean train.steps?"),
    (["--train.steps=x"], "train.steps: expected an integer, got 'x'"),
    (["--train.steps=1.5"], "expected an integer"),
    (["--loss.layerwise=maybe"], "expected true or false"),
    (["--student.layers=a,b"], "not a list of integers"),
    (["--train=3"], "'train' is a section"),
    (["steps"], "unexpected argument 'steps'"),
])
def test_override_errors_name_the_setting(args, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        DistillConfig().apply_overrides(args)


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("train:\n  steps: 12\nstudent:\n  layers: [2, 4]\nout: runs/y\n")
    cfg = DistillConfig.load(y)
    assert cfg.train.steps == 12 and cfg.student.layers == [2, 4] and cfg.out == "runs/y"
    j = tmp_path / "r.json"
    cfg.save(j)
    assert DistillConfig.load(j) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        DistillConfig.load(bad)
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting 'train.stepz'"):
        DistillConfig.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: the top level must be a mapping"):
        DistillConfig.load(bad)
    with pytest.raises(ConfigError, match="file not found"):
        DistillConfig.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("over, message", [
    ({"out": None}, "out is not set: give --out DIR"),
    ({"data__path": None}, "data.path is not set"),
    ({"student__report": "r.json"}, "student.layers and student.report are both set"),
    ({"student__layers": None, "student__report": "r.json"}, "student.report needs student.k"),
    ({"loss__kd": "kl"}, "loss.kd = 'kl': use one of forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tv, none"),
    ({"loss__kd_weight": 0.0}, "every loss term is off"),
    ({"loss__layerwise": True}, "loss.layerwise trains each replaced layer on its own output: set loss.hidden_weight"),
    ({"data__seq_len": 1}, "data.seq_len = 1 must be >= 2"),
    ({"loss__jsd_beta": 1.0}, r"loss.jsd_beta = 1.0 must be in \(0, 1\)"),
    ({"optim__lr": 0.0}, "optim.lr = 0.0 must be > 0"),
    ({"checkpoint__resume": "/nonexistent/ckpt"}, "checkpoint.resume: /nonexistent/ckpt does not exist"),
    ({"deepspeed": "ds_configs/nope.json"}, "deepspeed: ds_configs/nope.json not found"),
    ({"student__trainable": "everything"}, "student.trainable = 'everything': use one of mamba, mamba_mlp"),
])
def test_validate_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        _valid(**over).validate()


def test_batch_plan_from_world_size():
    cfg = _valid(train__micro_batch=2, train__global_batch=8).train
    assert plan_batch(cfg, 1) == BatchPlan(2, 4, 1) and plan_batch(cfg, 2) == BatchPlan(2, 2, 2)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch=2 x world size 3"):
        plan_batch(cfg, 3)
    cfg.grad_accum = 3
    with pytest.raises(ConfigError, match="train.grad_accum=3 disagrees with train.global_batch=8"):
        plan_batch(cfg, 2)
    cfg.global_batch = None
    assert plan_batch(cfg, 2).global_batch == 12


def test_explicit_deepspeed_values_are_checked(tmp_path):
    plan = BatchPlan(2, 1, 2)
    msg = r"x.json: train_batch_size=16 but micro_batch 2 x grad_accum 1 x world 2 gives 4"
    with pytest.raises(ConfigError, match=msg):
        fill_ds_config({"train_batch_size": 16}, plan, "float32", "x.json")
    with pytest.raises(ConfigError, match=r"bf16.enabled=True but model.dtype=float32"):
        fill_ds_config({"bf16": {"enabled": True}}, plan, "float32", "x.json")
    ok = fill_ds_config({"train_batch_size": 4, "zero_optimization": {"stage": 3}}, plan, "bfloat16", "x.json",
                        offload_params=True, optimizer=False)
    assert ok["bf16"]["enabled"] is True and ok["zero_optimization"]["offload_param"]["device"] == "cpu"
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_ds_config(bad)


def test_launcher_flags_help_and_precedence(tmp_path, capsys):
    from tests.distill_helpers import load_launcher

    mod = load_launcher("distill")
    y = tmp_path / "r.yaml"
    y.write_text("train:\n  steps: 12\n  micro_batch: 3\n")
    cfg = mod.make_config(["--config", str(y), "--steps", "5", "--layers", "1,3", "--data", "d.jsonl",
                           "--out", "o", "--train.micro_batch=4", "--local_rank=0"])
    assert cfg.train.steps == 5 and cfg.train.micro_batch == 4 and cfg.student.layers == [1, 3]
    with pytest.raises(SystemExit):
        mod.make_config(["--help"])
    text = capsys.readouterr().out
    for key, _, _ in field_help():
        assert f"--{key}" in text
    assert "deepspeed --hostfile" in text and "torchrun" in text
