"""Evaluation tasks are a registry (rad_ds.eval.registry): a toy ``reverse`` task registered at run time, with no
other file edited, is accepted by ``--tasks``, is in ``all``, is refused a ``--data`` file it does not read, is in
``--help`` when registered before the config is imported, and ``evaluate`` writes its results row with exactly the
score this test computes from the samples the model wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from scipy.stats import binomtest

from rad_ds.core.cli import parse_config
from rad_ds.core.config import ConfigError
from rad_ds.eval.cli import FLAGS
from rad_ds.eval.config import DATA_TASKS, GENERATION_TASKS, TASKS, EvalConfig
from rad_ds.eval.registry import REGISTRY, TaskSpec, names, register, unregister
from rad_ds.eval.run import evaluate
from tests.eval_helpers import save_models
from tests.eval_toy_task import ReverseTask, reverse_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registered():
    register("reverse", reverse_spec())  # the one registry line
    try:
        yield
    finally:
        unregister("reverse")
    assert "reverse" not in TASKS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("regmodels"))[0]


def _cli(tmp_path, *args) -> EvalConfig:
    return parse_config(EvalConfig, ["--model", "m", "--out", str(tmp_path / "o"), *args], None, FLAGS)


def test_a_registered_task_is_in_every_list_and_check(registered, tmp_path):
    assert TASKS[-1] == "reverse" and "reverse" in GENERATION_TASKS and "reverse" not in DATA_TASKS
    assert names(kind="generation")[-1] == "reverse"
    assert _cli(tmp_path, "--tasks", "reverse").validate(inputs_exist=False).tasks == ["reverse"]
    assert _cli(tmp_path, "--tasks", "all").validate(inputs_exist=False).tasks == list(REGISTRY)
    assert _cli(tmp_path, "--tasks", "reverse", "--limit", "91").limit == 91
    with pytest.raises(ConfigError, match="only 90 two-digit numbers"):  # from_config's check, run by validate
        _cli(tmp_path, "--tasks", "reverse", "--limit", "91").validate(inputs_exist=False)
    data = tmp_path / "words.txt"
    data.write_text("12\n")
    with pytest.raises(ConfigError, match="reverse generates its data and reads no file"):
        _cli(tmp_path, "--tasks", "reverse", "--data", f"reverse={data}").validate(inputs_exist=False)
    with pytest.raises(ValueError, match="already registered"):
        register("reverse", REGISTRY["reverse"])
    assert "reverse" not in EvalConfig.__dataclass_fields__["tasks"].metadata["help"]  # built at import: below


def test_an_unregistered_or_inconsistent_task_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task\(s\) reverse; choose from gsm8k,.*,speed$"):
        _cli(tmp_path, "--tasks", "reverse").validate(inputs_exist=False)
    with pytest.raises(ValueError, match="its class calls itself 'reverse'"):
        register("reversed", TaskSpec("generation", "x", None, ReverseTask))
    with pytest.raises(ValueError, match="takes_data = False, its entry's data is 'word'"):
        register("reverse", TaskSpec("generation", "x", "word", ReverseTask))
    with pytest.raises(ValueError, match="kind 'chat' is not one of"):
        register("reverse", TaskSpec("chat", "x", None))
    assert "reverse" not in TASKS and "reversed" not in REGISTRY


def test_help_lists_a_task_registered_before_the_config_is_imported():
    """The --help texts are built when rad_ds.eval.config is imported: a registry line in registry.py (here: a
    plug-in registering before that import) is in them; a task registered later is checked and run, not listed."""
    code = ("from rad_ds.eval.registry import register\n"
            "from tests.eval_toy_task import reverse_spec\n"
            "register('reverse', reverse_spec())\n"
            "from rad_ds.eval.cli import main\n"
            "main(['--help'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps the help lines
    assert "reverse (reverse a number's digits, exact match, generated)" in text and "reverse 4" in text


def _run(base, out: Path) -> tuple[dict, list[dict]]:
    """Evaluate ``reverse`` on 12 numbers in batches of 5; (its row in results.json, its samples file)."""
    evaluate(EvalConfig(models=[str(base)], out=str(out), tasks=["reverse"], limit=12, progress=False, batch_size=5))
    (row,) = json.loads((out / "results.json").read_text())["results"]
    return row, [json.loads(x) for x in (out / "samples" / "base" / "reverse.jsonl").read_text().splitlines()]


def test_evaluate_scores_a_registered_task_as_its_samples_say(registered, base, tmp_path):
    """The row in results.json has the score this test computes from the outputs in samples/, by its own
    comparison, with n and the 95% Wilson interval. The tiny model cannot reverse digits, so a second run sets 5
    targets to what it wrote there (the prompts, hence the greedy outputs, are unchanged): 5 more right answers."""
    row, samples = _run(base, tmp_path / "a")
    assert [s["index"] for s in samples] == list(range(12))
    right = [s["output"].split()[:1] == [s["word"][::-1]] for s in samples]
    assert [s["correct"] for s in samples] == right
    assert (row["task"], row["metric"], row["n"], row["max_new_tokens"]) == ("reverse", "exact_match", 12, 4)
    assert row["score"] == sum(right) / 12
    before = right

    answers = {s["index"]: s["output"].split()[0] for s in samples if s["output"].split()}
    answers = dict(list(answers.items())[:5])
    assert len(answers) == 5, [s["output"] for s in samples]  # the tiny model writes words

    class Rigged(ReverseTask):  # the same task (name, prompts), with the targets set by the test
        def load(self, data, limit, seed):
            return [replace(s, target=answers.get(s.index, s.target)) for s in super().load(data, limit, seed)]

    register("reverse", replace(reverse_spec(), task=Rigged), replace=True)
    row, rigged = _run(base, tmp_path / "b")
    assert [s["output"] for s in rigged] == [s["output"] for s in samples]
    targets = [answers.get(i, s["word"][::-1]) for i, s in enumerate(samples)]
    right = [s["output"].split()[:1] == [t] for s, t in zip(rigged, targets)]
    k = sum(right)
    assert [s["correct"] for s in rigged] == right and k == 5 + sum(r for i, r in enumerate(before) if i not in answers)
    assert row["score"] == k / 12 and row["n"] == 12
    wilson = binomtest(k, 12).proportion_ci(method="wilson")
    assert row["ci95"] == pytest.approx([wilson.low, wilson.high], abs=1e-6)
