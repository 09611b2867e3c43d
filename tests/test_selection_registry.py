"""Placement strategies are a registry (rad_ds.selection.registry): a toy ``last_k`` registered at run time is
accepted by every config check (distill's ``student.placement``, the study's ``methods``), runs through
``choose_layers`` and ``choose_for_run``, and picks exactly the last k attention layers; an unknown name is refused
in one line that lists the table; no name list of the built-ins lives outside rad_ds/selection/."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rad_ds.core.config import ConfigError
from rad_ds.core.layers import attention_layers
from rad_ds.selection import Choice, Inputs, SelectionError, Strategy, choose_for_run, choose_layers, names, register
from rad_ds.selection.registry import METHODS, NEEDS_REPORT, unregister
from rad_ds.selection.spacing import check_k
from rad_ds.study.config import StudyConfig
from tests.distill_helpers import load_launcher, run_args, save_base, write_chat_jsonl, write_text_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ["attention", "mamba2", "attention", "attention", "mamba2", "attention"]


def last_k(k: int, inputs: Inputs) -> Choice:
    """The toy strategy: the last k attention layers (what a newcomer's one new file would hold)."""
    t0 = time.perf_counter()
    cands = attention_layers(inputs.config)
    k = check_k(k, cands)
    return Choice(tuple(cands[-k:]), "last_k", k, time.perf_counter() - t0, 0)


@pytest.fixture
def registered():
    register(Strategy("last_k", last_k, "the last k attention layers"))  # the one registry line
    try:
        yield
    finally:
        unregister("last_k")
    assert "last_k" not in names()


def test_a_registered_strategy_runs_and_picks_the_last_k_attention_layers(registered):
    cfg = SimpleNamespace(layer_types=LAYOUT)
    assert "last_k" in METHODS and "last_k" not in NEEDS_REPORT and names()[-1] == "last_k"
    for k, expected in [(1, (5,)), (2, (3, 5)), (4, (0, 2, 3, 5))]:
        c = choose_layers("last_k", k, cfg)
        assert (c.method, c.k, c.layers) == ("last_k", k, expected)
    with pytest.raises(SelectionError, match=r"student.k = 5"):
        choose_layers("last_k", 5, cfg)
    run = SimpleNamespace(student=SimpleNamespace(placement="last_k", k=2, report=None, placement_seed=0))
    layers, record = choose_for_run(run, cfg, None)  # the distillation run's path (rank 0 chooses)
    assert layers == [3, 5] and record["placement"] == "last_k"


def test_config_checks_accept_a_registered_strategy(registered, tmp_path):
    base = save_base(tmp_path, num_hidden_layers=4)
    text = write_text_jsonl(tmp_path / "text.jsonl", n=8)
    args = run_args(tmp_path, base, text, tmp_path / "out", steps=2)
    i = args.index("--layers")
    args = args[:i] + args[i + 2:] + ["--student.placement=last_k", "--k", "2"]
    distill_cfg = load_launcher("distill").make_config(args).validate()
    assert distill_cfg.student.placement == "last_k"

    study = StudyConfig(out=str(tmp_path / "study"), model=str(base), methods=["even", "last_k"],
                        test=str(write_chat_jsonl(tmp_path / "held.jsonl", n=4, seed=9)))
    study.distill.data.path = str(write_chat_jsonl(tmp_path / "train.jsonl", n=4))
    study.distill.deepspeed, study.distill.teacher.deepspeed = args[args.index("--deepspeed") + 1], \
        args[args.index("--teacher.deepspeed") + 1]
    assert study.validate().methods == ["even", "last_k"]


def test_unknown_names_are_refused_in_one_line_listing_the_registry(registered, tmp_path):
    with pytest.raises(SelectionError) as e:
        choose_layers("nope", 1, SimpleNamespace(layer_types=LAYOUT))
    msg = str(e.value)
    assert "'nope' is not a placement method" in msg and "\n" not in msg
    assert msg.endswith("use one of " + ", ".join(names())) and "last_k" in msg and "kl_probe" in msg
    study = StudyConfig(out=str(tmp_path), methods=["rad", "nope"])
    with pytest.raises(ConfigError) as e:
        study.validate()
    assert str(e.value) == f"methods: 'nope' is not a placement method; use one of {', '.join(names())}"


def test_registering_twice_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        register(Strategy("even", last_k, "x"))
    with pytest.raises(ValueError, match="seed"):
        register(Strategy("odd", last_k, "x", seed="sometimes"))


def _name_lists(path: Path) -> list[int]:
    """Lines of tuple / list / set literals holding two or more built-in strategy names, a setting's default value
    (``setting([...], "...")``: which strategies a study compares unless told) excepted."""
    tree = ast.parse(path.read_text())
    defaults = {id(c.args[0]) for c in ast.walk(tree) if isinstance(c, ast.Call) and c.args
                and getattr(c.func, "id", None) == "setting"}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Tuple, ast.List, ast.Set)) and id(n) not in defaults
            and sum(isinstance(e, ast.Constant) and e.value in BUILT_IN for e in n.elts) >= 2]


BUILT_IN = ("rad", "single_skip", "even", "random", "cosine", "kl_probe")


def test_no_list_of_strategy_names_outside_the_registry():
    assert tuple(names()) == BUILT_IN
    found = {p.relative_to(ROOT).as_posix(): lines for p in sorted((ROOT / "rad_ds").rglob("*.py"))
             if (lines := _name_lists(p)) and p.name != "registry.py"}
    assert found == {}
