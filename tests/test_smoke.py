"""The README's main command in a short form (configs/rad_smoke.yaml: the embedded SmolLM2, 2 ranks under
the real deepspeed launcher, a tiny budget) from an empty RAD_DS_CACHE, as a new user's first run meets it.
Every stage must finish the first time, the embedded model must be imported exactly once although both
ranks of the first stage ask for it at the same moment, and the comparison table must be written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rad_ds.core.shared_cache import is_complete

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_command_from_a_cold_cache(tmp_path):
    try:
        from rad_ds.models.conversion import smollm2_gguf

        smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache, out = tmp_path / "cold_cache", tmp_path / "smoke_run"
    env = {**os.environ, "RAD_DS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "launchers" / "rad.py"), "--config", str(ROOT / "configs" / "rad_smoke.yaml"),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert log.count("importing ") == 1 and "(once)" in log, log[-4000:]  # one import for both ranks
    assert is_complete(cache / "smollm2-135m-instruct")
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []

    for stage in ("diagnose", "replace", "distill", "evaluate"):
        assert f"== {stage}: " in r.stdout and f"stage {stage} failed" not in log
    report = json.loads((out / "diagnosis" / "report.json").read_text())
    layers = next(s["layers"] for s in report["selections"] if s["k"] == 2)
    final = json.loads((out / "distill" / "final" / "config.json").read_text())
    assert final["replaced_layers"]["layers"] == layers
    from rad_ds.models import RadHybridConfig

    assert sorted(RadHybridConfig.from_pretrained(out / "distill" / "final").mamba_layers) == layers
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["last_step"] == summary["steps"] == 2 and summary["world"] == 2
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {(x["model"], x["task"]) for x in results["results"]} >= {
        (m, t) for m in ("embedded:smollm2", "final") for t in ("gsm8k", "arithmetic", "ppl", "speed")}
    table = (out / "comparison.md").read_text()
    assert f"attention layers {layers}" in table and "Distillation: 2 steps on 2 rank(s)" in table
    assert "| ppl | perplexity |" in table and table in r.stdout
