"""launchers/rad.py: the whole pipeline on a tiny model (stages in one process; test_smoke.py runs them
under deepspeed); a re-run skips finished stages; the whole YAML is checked before any stage runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.model_factories import save_tiny_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pipeline_end_to_end_and_resume(tmp_path):
    base, _ = save_tiny_with_tokenizer(tmp_path, num_hidden_layers=4)
    words = lambda i, n: " ".join(f"w{(13 * i + 7 * j) % 300}" for j in range(n))  # noqa: E731
    chats = _write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": words(i, 8)}, {"role": "assistant", "content": words(i + 50, 12)}]}
        for i in range(16)])
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": words(i, 5), "answer": f"w1 w2\n#### {i}"}
                                                for i in range(3)])
    text = tmp_path / "ppl.txt"
    text.write_text("\n".join(words(i, 40) for i in range(3)) + "\n")
    cfg = {
        "out": str(tmp_path / "run"), "model": str(base), "k": 1, "nproc": 1,
        "diagnose": {"k": [1, 2], "tokens": 96, "held_out_tokens": 48, "trials": 4, "max_new_tokens": 12,
                     "cost_model": "weights", "recheck_prompts": 1},
        "distill": {"data.path": str(chats), "data.seq_len": 32, "train.steps": 2, "train.micro_batch": 2,
                    "wandb": False, "log.progress": False},
        "evaluate": {"tasks": "gsm8k,arithmetic,passkey,ppl", "data": [f"gsm8k={gsm}", f"ppl={text}"],
                     "max_new_tokens": 8, "ppl_window": 64, "progress": False, "arithmetic_samples": 4,
                     "passkey_contexts": [64], "passkey_depths": [0.5], "passkey_samples": 1},
    }
    conf = tmp_path / "rad.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "launchers" / "rad.py"), "--config", str(conf)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    run = tmp_path / "run"
    rep = json.loads((run / "diagnosis" / "report.json").read_text())
    # the diagnosis scored masks on the run's own distillation data (its answers, teacher-forced), expected signal
    assert rep["data"]["path"] == str(chats) and rep["data"]["positions"] >= 96
    assert rep["settings"]["signal"] == "expected" and rep["settings"]["scored_on"] == "documents"
    layers = next(s["layers"] for s in rep["selections"] if s["k"] == 1)
    student_cfg = json.loads((run / "student" / "config.json").read_text())
    assert student_cfg["replaced_layers"]["layers"] == layers
    final_cfg = json.loads((run / "distill" / "final" / "config.json").read_text())
    assert final_cfg["replaced_layers"]["layers"] == layers
    # self-distillation: the distill stage rebuilt the same student from the base, its teacher held once
    assert json.loads((run / "distill" / "summary.json").read_text())["teacher_location"] == "shared"
    from safetensors.torch import load_file

    built, written = load_file(run / "student" / "model.safetensors"), load_file(run / "distill" / "final" /
                                                                                  "model.safetensors")
    frozen = [k for k in built if ".mamba." not in k]
    assert frozen and all(torch.equal(built[k], written[k]) for k in frozen)
    res = json.loads((run / "eval" / "results.json").read_text())
    assert {r["task"] for r in res["results"]} == {"gsm8k", "arithmetic", "passkey", "ppl"}
    assert len({r["model"] for r in res["results"]}) == 2
    table = (run / "comparison.md").read_text()
    assert "| ppl |" in table and f"{layers}" in table
    assert "| arithmetic | exact_match | " in table and "| passkey | exact_match@64 | " in table
    assert "Distillation: 2 steps" in table

    # everything done: a re-run skips every stage; a missing result is redone alone
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r2.returncode == 0 and r2.stdout.count("done already, skipped") == 5, r2.stdout[-2000:]
    (run / "eval" / "results.json").unlink()
    r3 = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert r3.stdout.count("done already, skipped") == 4 and "== evaluate: " in r3.stdout
    assert json.loads((run / "eval" / "results.json").read_text())["results"]


def test_pipeline_config_errors(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "k": 3, "diagnose": {"k": [2, 4]}}))
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "rad.py"), "--config", str(conf)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "must be one of diagnose.k" in r.stderr.strip().splitlines()[-1]
    conf.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "colour": "red"}))
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "rad.py"), "--config", str(conf)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "unknown setting" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("section, body, message", [
    ("diagnose", {"trails": 3}, "unknown setting 'diagnose.trails'; did you mean diagnose.trials?"),
    ("distill", {"config": "configs/smollm2_demo.yaml", "train.stepz": 3},
     "unknown setting 'distill.train.stepz'; did you mean distill.train.steps?"),
    ("distill", {"train": {"colour": 1}}, "unknown setting 'distill.train.colour'; known: distill.train.steps"),
    ("evaluate", {"limt": 3}, "unknown setting 'evaluate.limt'; did you mean evaluate.limit?"),
    ("evaluate", {"zzz": 1}, "unknown setting 'evaluate.zzz'; known: evaluate.models, evaluate.out"),
    ("evaluate", {"limit": 0}, "section evaluate: limit = 0 must be >= 1"),
    ("replace", {"init": "zeros"}, "section replace: init = 'zeros': use one of attention, attention_skip, random"),
])
def test_a_typo_in_any_section_fails_before_any_stage(tmp_path, section, body, message):
    from rad_ds.core.config import ConfigError
    from rad_ds.pipeline import PipelineConfig

    cfg = {"out": str(tmp_path / "o"), "distill": {"config": "configs/smollm2_demo.yaml"}, section: body}
    conf = tmp_path / "rad.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load(conf)
    assert message in str(e.value) and str(conf) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_typo_fails_in_seconds_from_the_command_line(tmp_path):
    conf = tmp_path / "rad.yaml"
    conf.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "evaluate": {"limt": 3}}))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "rad.py"), "--config", str(conf)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and time.perf_counter() - t0 < 30
    assert r.stderr.strip().splitlines() == [f"error: {conf}: unknown setting 'evaluate.limt'; did you mean "
                                             "evaluate.limit?"]
    assert not (tmp_path / "o").exists()
