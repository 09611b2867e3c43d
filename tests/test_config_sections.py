"""The sections every stage config shares (``rad_ds.core.sections``): the model reference and wandb. Their
primary field is set by the section's own name (``--model DIR``, ``model: DIR``, ``--wandb``, ``--no-wandb``),
the old flat names still work for one release with one warning naming the new key, and a config round-trips
through ``to_dict`` / ``from_dict`` (the pipeline's ``OUT/configs/<stage>.json``)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import yaml

from rad_ds.core.cli import parse_config
from rad_ds.core.config import ConfigError, load_file
from rad_ds.core.sections import ModelRef, WandbConfig
from rad_ds.data.corpus_config import CorpusConfig
from rad_ds.diagnosis.config import DiagnoseConfig
from rad_ds.distill.config import DistillConfig
from rad_ds.eval.config import EvalConfig
from rad_ds.pipeline import PipelineConfig
from rad_ds.study.config import StudyConfig
from rad_ds.surgery.config import ReplaceConfig
from rad_ds.teacher_cache.config import TeacherCacheConfig

ROOT = Path(__file__).resolve().parents[1]

# every stage config with its model reference (the corpus and the teacher cache name theirs teacher); the
# evaluation compares a list of models side by side (``models``), so it has none
MODEL_SECTIONS = [(ReplaceConfig, "model"), (DiagnoseConfig, "model"), (DistillConfig, "model"), (DistillConfig, "teacher"),
                  (StudyConfig, "model"), (PipelineConfig, "model"), (TeacherCacheConfig, "teacher"),
                  (CorpusConfig, "teacher")]
# the stages that log to wandb; in the study and the pipeline it is their stage sections' own
WANDB_SECTIONS = [(DiagnoseConfig, "wandb"), (DistillConfig, "wandb"), (EvalConfig, "wandb"),
                  (StudyConfig, "distill.wandb"), (PipelineConfig, "diagnose.wandb"), (PipelineConfig, "evaluate.wandb")]
STAGES = [ReplaceConfig, DiagnoseConfig, DistillConfig, EvalConfig, StudyConfig, PipelineConfig, TeacherCacheConfig,
          CorpusConfig]

# old name -> new name, and a value, per config (the CHANGELOG's list)
RENAMES = [
    (ReplaceConfig, "gguf_file", "model.gguf_file", "m.gguf"),
    (DiagnoseConfig, "gguf_file", "model.gguf_file", "m.gguf"),
    (DiagnoseConfig, "dtype", "model.dtype", "bf16"),
    (DiagnoseConfig, "wandb_project", "wandb.project", "p"),
    (DiagnoseConfig, "wandb_run", "wandb.run", "r"),
    (EvalConfig, "wandb_project", "wandb.project", "p"),
    (EvalConfig, "wandb_run", "wandb.run", "r"),
    (DistillConfig, "log.wandb", "wandb.enabled", False),
    (DistillConfig, "log.project", "wandb.project", "p"),
    (DistillConfig, "log.run_name", "wandb.run", "r"),
    (PipelineConfig, "gguf_file", "model.gguf_file", "m.gguf"),
    (PipelineConfig, "diagnose.dtype", "diagnose.model.dtype", "bf16"),  # a stage's renames hold inside the pipeline
    (PipelineConfig, "distill.log.wandb", "distill.wandb.enabled", False),
    (StudyConfig, "distill.log.run_name", "distill.wandb.run", "r"),
]


def _ids(rows):
    return [f"{r[0].__name__}-{r[1]}" for r in rows]


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("cls,sec", MODEL_SECTIONS, ids=_ids(MODEL_SECTIONS))
def test_model_section_is_set_by_its_name(cls, sec, tmp_path, no_warnings):
    assert cls().apply_overrides([f"--{sec}", "X"]).get(f"{sec}.path") == "X"
    assert cls().apply_overrides([f"--{sec}=X"]).get(f"{sec}.path") == "X"
    cfg = cls().apply_overrides([f"--{sec}.path", "X", f"--{sec}.gguf_file", "g.gguf", f"--{sec}.dtype=bfloat16"])
    assert (cfg.get(f"{sec}.path"), cfg.get(f"{sec}.gguf_file"), cfg.get(f"{sec}.dtype")) == ("X", "g.gguf", "bfloat16")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({sec: "X"}))
    assert _load(cls, f).get(f"{sec}.path") == "X"
    f.write_text(yaml.safe_dump({sec: {"path": "Y", "gguf_file": "g.gguf"}}))
    assert (_load(cls, f).get(f"{sec}.path"), _load(cls, f).get(f"{sec}.gguf_file")) == ("Y", "g.gguf")
    assert isinstance(cls().get(sec), ModelRef)


@pytest.mark.parametrize("cls,sec", WANDB_SECTIONS, ids=_ids(WANDB_SECTIONS))
def test_wandb_section_is_switched_by_its_name(cls, sec, tmp_path, no_warnings):
    assert cls().apply_overrides([f"--{sec}"]).get(f"{sec}.enabled") is True
    assert cls().apply_overrides([f"--{sec}=false"]).get(f"{sec}.enabled") is False
    head, _, tail = sec.rpartition(".")
    negated = f"--{head}.no-{tail}" if head else f"--no-{tail}"
    assert cls().apply_overrides([f"--{sec}", negated]).get(f"{sec}.enabled") is False
    cfg = cls().apply_overrides([f"--{sec}.project", "P", f"--{sec}.run=R"])
    assert (cfg.get(f"{sec}.project"), cfg.get(f"{sec}.run")) == ("P", "R")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_nested(sec, True)))
    assert _load(cls, f).get(f"{sec}.enabled") is True
    f.write_text(yaml.safe_dump(_nested(sec, {"enabled": True, "project": "P"})))
    assert _load(cls, f).get(f"{sec}.project") == "P"
    assert isinstance(cls().get(sec), WandbConfig)


def _load(cls, path):
    """``cls.load`` without the pipeline's joining and validation (``PipelineConfig.load`` adds those)."""
    return cls.from_dict(load_file(path), source=str(path))


def _nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_wandb_defaults_and_constructor():
    """distillation logs by default (as before), the other stages do not; a constructor value sets the primary."""
    assert DistillConfig().wandb.enabled and not DiagnoseConfig().wandb.enabled and not EvalConfig().wandb.enabled
    assert DistillConfig().wandb.project == DiagnoseConfig().wandb.project == "rad-ds"
    assert DiagnoseConfig(model="m", wandb=True).model.path == "m" and DiagnoseConfig(wandb=True).wandb.enabled
    assert ReplaceConfig(model="m").model.dtype == "float32"  # the stage's own default stays


def test_a_section_without_a_primary_still_needs_a_field():
    with pytest.raises(ConfigError, match=r"'train' is a section; set one of its fields"):
        DistillConfig().apply_overrides(["--train", "3"])
    with pytest.raises(ConfigError, match="unknown setting 'no_such'"):
        DistillConfig().apply_overrides(["--no-such"])
    with pytest.raises(ConfigError, match="unknown setting 'no_out'"):  # --no- only negates true/false settings
        DistillConfig().apply_overrides(["--no-out"])


@pytest.mark.parametrize("cls,old,new,value", RENAMES, ids=[f"{r[0].__name__}-{r[1]}" for r in RENAMES])
def test_old_keys_set_the_new_one_with_one_warning(cls, old, new, value, tmp_path, caplog):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_nested(old, value)))
    for make in (lambda: _load(cls, f), lambda: cls().apply_overrides([f"--{old}={value}"])):
        caplog.clear()
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            cfg = make()
        assert cfg.get(new) == cfg.get(new).__class__(value) if not isinstance(value, bool) else cfg.get(new) is value
        dep = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
        assert len(dep) == 1 and f"{old} is deprecated" in dep[0] and f"it sets {new}," in dep[0], dep
        lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0] and old in lines[0] and new in lines[0]


@pytest.mark.parametrize("cls", STAGES, ids=[c.__name__ for c in STAGES])
def test_round_trip_through_a_dict_and_json(cls, tmp_path, no_warnings):
    cfg = cls()
    for key, primary in cls.primaries().items():
        if key.endswith(".path"):
            cfg.set(key, "some/model")
            cfg.set(primary + ".gguf_file", "m.gguf")
        else:
            cfg.set(key, True)
            cfg.set(primary + ".run", "r")
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    cfg.save(tmp_path / "c.json")
    assert _load(cls, tmp_path / "c.json") == cfg


@pytest.mark.parametrize("cls", STAGES, ids=[c.__name__ for c in STAGES])
def test_help_lists_the_new_names(cls, capsys):
    with pytest.raises(SystemExit):
        parse_config(cls, ["--help"], "doc")
    out = capsys.readouterr().out
    for key, short in cls.primaries().items():
        assert f"--{short}, --{key} " in out
    for gone in ("--gguf-file ", "--wandb-project", "--wandb-run", "--log.wandb", "--log.project", "--log.run_name"):
        assert gone not in out
    if "model.path" in cls.keys():
        assert "--model.gguf_file" in out and "--model.dtype" in out


def test_required_model_is_named_by_its_short_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(ReplaceConfig, ["--out", "o"], "doc", required=("model.path", "out"))
    assert "missing --model" in capsys.readouterr().err


def test_teacher_dtype_follows_the_model():
    cfg = DistillConfig()
    cfg.teacher.dtype = "bfloat16"
    with pytest.raises(ConfigError, match="teacher.dtype = bfloat16: the teacher runs in model.dtype"):
        cfg.validate()


def test_pipeline_joins_the_model_into_its_stages(tmp_path, no_warnings):
    f = tmp_path / "rad.yaml"
    f.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "diagnose": {"k": [2]},
                                 "model": {"path": "base", "gguf_file": "g.gguf", "dtype": "bfloat16"},
                                 "distill": {"data": {"path": str(ROOT / "rad_ds/data/demo_chat.jsonl")}}}))
    cfg = PipelineConfig.load(f, {"model": "embedded:smollm2"})  # launchers/rad.py --model: the path alone
    for ref in (cfg.diagnose.model, cfg.replace.model, cfg.distill.model):
        assert (ref.path, ref.gguf_file, ref.dtype) == ("embedded:smollm2", "g.gguf", "bfloat16")
    assert cfg.evaluate.dtype == "bfloat16" and cfg.evaluate.models[0] == "embedded:smollm2/g.gguf"


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_use_no_old_name(path, no_warnings):
    data = yaml.safe_load(path.read_text()) or {}
    cls = (PipelineConfig if "evaluate" in data or "replace" in data else StudyConfig if "methods" in data
           else CorpusConfig if "math" in data or "split" in data else DistillConfig)
    if cls is PipelineConfig:  # each section over its base file, as PipelineConfig.load reads it (no validation)
        for name in ("diagnose", "replace", "distill", "evaluate"):
            sec = dict(data.pop(name, None) or {})
            base = sec.pop("config", None)
            if base is not None:
                DistillConfig.load(ROOT / base)
            PipelineConfig.from_dict({name: sec})
        PipelineConfig.from_dict(data)
    else:
        cls.load(path)


@pytest.mark.parametrize("cls", [DistillConfig, TeacherCacheConfig])
def test_teacher_placement_is_now_teacher_location(cls, caplog):
    """``teacher.placement`` (where the teacher runs) was renamed ``teacher.location`` so that "placement" means only
    which layers become Mamba2; the old key still sets the new one for a release, with one warning naming both."""
    cfg = cls()
    with pytest.warns(DeprecationWarning, match="teacher.placement is deprecated.*teacher.location"):
        cfg.apply_overrides(["--teacher.placement=zero3"])
    assert cfg.teacher.location == "zero3" and not hasattr(cfg.teacher, "placement")
