"""launchers/diagnose.py for real: 1 process == 2 ranks under the deepspeed launcher; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_factories import save_tiny_with_tokenizer
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DIAG = str(ROOT / "launchers" / "diagnose.py")


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diagcli")
    base, _ = save_tiny_with_tokenizer(tmp, num_hidden_layers=6)
    prompts = tmp / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(
                f"w{(11 * i + 3 * j) % 300}" for j in range(4 + i))}]}) + "\n")
    data = tmp / "data.jsonl"  # the "distillation data": documents the masks are scored on, teacher-forced
    with data.open("w") as f:
        for i in range(9):
            f.write(json.dumps({"text": " ".join(f"w{(7 * i + 5 * j) % 300}" for j in range(30 + 3 * i))}) + "\n")
    return tmp, base, prompts, data


def _args(base, prompts, out, *extra):
    return ["--model", str(base), "--k", "1,3", "--out", str(out), "--prompts", str(prompts), "--trials", "8",
            "--max-new-tokens", "20", "--num-prompts", "4", "--held-out", "2", "--swap-evals", "6",
            "--recheck-prompts", "1", *extra]


def test_one_process_equals_two_ranks_under_deepspeed(setup):
    """The expected signal on documents and continuations at once: every score is a float sum, still equal."""
    tmp, base, prompts, data = setup
    extra = ["--data", str(data), "--source", "both", "--tokens", "120", "--held-out-tokens", "60", "--seq-len", "24"]
    r1 = subprocess.run([PY, DIAG, *_args(base, prompts, tmp / "one", *extra)], capture_output=True, text=True,
                        env=_env(), timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    port = str(free_port())
    r2 = subprocess.run([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port, DIAG,
                         *_args(base, prompts, tmp / "two", *extra)], capture_output=True, text=True, env=_env(),
                        timeout=600)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    a = json.loads((tmp / "one" / "report.json").read_text())
    b = json.loads((tmp / "two" / "report.json").read_text())
    assert a["settings"]["world_size"] == 1 and b["settings"]["world_size"] == 2
    assert all(0 < s["measured_acceptance_rate"] <= 1 for s in a["selections"])  # the sampling re-check ran
    for s in a["selections"] + b["selections"]:  # timings (and the sampled re-check) differ between runs; drop them
        s.pop("measured_speedup"), s.pop("measured_acceptance_rate")
    assert a["selections"] == b["selections"]  # with the swap search, gains and bootstrap intervals
    assert a["layers"] == b["layers"]
    assert a["trials"] == b["trials"]
    assert a["held_out"] == b["held_out"] and a["held_out"]["n"] == 2  # held-out prompts sharded over ranks too
    assert a["held_out"]["documents"] >= 2 and a["held_out"]["positions"] >= 60  # and held-out documents
    assert a["stability"] == b["stability"]
    assert a["settings"]["signal"] == "expected" and a["settings"]["scored_on"] == "both"
    assert a["data"]["positions"] >= 120 and a["data"]["windows"] >= 5
    assert all(s["estimator_exact"] is None for s in b["selections"])  # exactness is greedy's, on continuations
    assert all(0 < s["mean_alpha"] < 1 for s in a["selections"])
    assert "| k | layers |" in r1.stdout  # the summary table


def test_bad_input_exits_nonzero_and_keeps_a_good_report(setup):
    tmp, base, prompts, _ = setup
    out = tmp / "keep"
    r = subprocess.run([PY, DIAG, *_args(base, prompts, out)], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    before = (out / "report.json").read_bytes()
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    long_p = tmp / "long.jsonl"
    long_p.write_text(json.dumps({"prompt": " ".join(["w1"] * 300)}) + "\n")
    nofield = tmp / "nofield.jsonl"
    nofield.write_text(json.dumps({"foo": "bar"}) + "\n")
    cases = [
        (["--k", "7"], "must be in [1, 6]"),
        (["--k", "0,2"], "must be in [1, 6]"),
        (["--prompts", str(empty)], "empty"),
        (["--prompts", str(tmp / "missing.jsonl")], "not found"),
        (["--prompts", str(nofield)], "no prompt field"),
        (["--prompts", str(long_p)], "exceeds the model's context"),
    ]
    # without --overwrite the finished report is refused outright; with it, the old report is moved aside, the bad
    # input fails, and the old report is put back
    r = subprocess.run([PY, DIAG, *_args(base, prompts, out)], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode != 0 and "holds a finished diagnosis; pass --overwrite" in r.stderr, r.stderr[-1500:]
    for extra, msg in cases:
        r = subprocess.run([PY, DIAG, *_args(base, prompts, out), "--overwrite", *extra], capture_output=True,
                           text=True, env=_env(), timeout=600)
        assert r.returncode != 0, extra
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last, (extra, r.stderr[-1500:])
        assert (out / "report.json").read_bytes() == before
        assert not list(out.glob(".previous.tmp-*")), extra


def test_model_without_attention_layers_is_refused(tmp_path):
    from rad_ds.models.conversion import load_model
    from rad_ds.surgery import replace_attention
    from tests.model_factories import tiny_tokenizer

    base, _ = save_tiny_with_tokenizer(tmp_path, num_hidden_layers=2)
    model, _ = load_model(base)
    replace_attention(model, [0, 1], allow_all=True)
    model.save_pretrained(tmp_path / "ssm")
    tiny_tokenizer(320).save_pretrained(tmp_path / "ssm")
    r = subprocess.run([PY, DIAG, "--model", str(tmp_path / "ssm"), "--k", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode != 0 and "no attention layers" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()
