"""launchers/evaluate.py for real: 1 process == 2 ranks under the deepspeed launcher; bad input gives one
line and a non-zero exit before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval_helpers import save_models, strip_timings, write_gsm, write_texts
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
EVAL = str(ROOT / "launchers" / "evaluate.py")


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    base, student = save_models(tmp)
    return tmp, base, student, write_gsm(tmp / "gsm.jsonl", n=5), write_texts(tmp / "texts.txt", 3)


def _args(student, gsm, texts, out, *extra):
    return ["--model", str(student), "--tasks", "gsm8k,humaneval,cruxeval,ppl,speed", "--limit", "5",
            "--batch-size", "2", "--max-new-tokens", "10", "--data", f"gsm8k={gsm}", "--data", f"ppl={texts}",
            "--skip-layers", "1", "--speed-prompts", "3", "--timeout", "5", "--no-progress", "--out", str(out), *extra]


def test_one_process_equals_two_ranks_under_deepspeed(setup, capsys):
    tmp, _, student, gsm, texts = setup
    threads = torch.get_num_threads()
    # one process: the launcher's main() here (the same code a plain `python launchers/evaluate.py` runs)
    from launchers.evaluate import main

    torch.set_num_threads(1)
    try:
        assert main(_args(student, gsm, texts, tmp / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    port = str(free_port())
    r2 = subprocess.run([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port, EVAL,
                         *_args(student, gsm, texts, tmp / "two")], capture_output=True, text=True, env=_env(),
                        timeout=600)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    a = json.loads((tmp / "one" / "results.json").read_text())
    b = json.loads((tmp / "two" / "results.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert strip_timings(a) == strip_timings(b)
    ppl = [[r for r in x["results"] if r["task"] == "ppl"][0] for x in (a, b)]
    assert ppl[0]["ci95"] is not None and ppl[0]["ci95"] == ppl[1]["ci95"]  # per-document sums: same bootstrap
    for task in ("gsm8k", "humaneval", "cruxeval"):  # every sample, output and verdict
        assert (tmp / "one" / "samples" / "student" / f"{task}.jsonl").read_text() == \
               (tmp / "two" / "samples" / "student" / f"{task}.jsonl").read_text()
    speed = [r for r in b["results"] if r["task"] == "speed"][0]["details"]
    assert speed["prompts"] == 3 and speed["speculative"]["same_tokens"] is True
    assert "| model | task | n | metric | score | ± | tokens/s |" in stdout


def test_bad_input_is_one_line_and_nothing_is_written(setup, capsys):
    """Checked in-process through the launcher's own run_cli (as the subprocess does), plus one real exit."""
    from launchers.evaluate import main
    from rad_ds.core.cli import run_cli

    tmp, base, _, gsm, _ = setup
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"question": "w1", "answer": "#### 1"}\n{"question": \n')
    no_answer = tmp / "noanswer.jsonl"
    no_answer.write_text(json.dumps({"question": "w1 w2"}) + "\n")
    no_number = tmp / "nonumber.jsonl"
    no_number.write_text(json.dumps({"question": "w1", "answer": "#### many"}) + "\n")
    report = tmp / "report.json"
    report.write_text(json.dumps({"selections": [{"k": 2, "layers": [1, 3]}]}))
    out = tmp / "bad_out"
    m = ["--model", str(base), "--out", str(out)]
    cases = [
        (["--tasks", "gsm8k,foo"], "unknown task(s) foo"),
        (["--tasks", ""], "tasks is empty"),
        (["--tasks", "gsm8k", "--model", str(tmp / "nope")], "no such directory"),
        (["--tasks", "gsm8k", "--data", str(tmp / "missing.jsonl")], "file not found"),
        (["--tasks", "gsm8k,ppl", "--data", str(gsm)], "say which task"),
        (["--tasks", "gsm8k", "--data", f"humaneval={gsm}"], "is not in tasks"),
        (["--tasks", "gsm8k", "--data", str(bad_json)], "line 2: not valid JSON"),
        (["--tasks", "gsm8k", "--data", str(no_answer)], "missing field(s) answer"),
        (["--tasks", "gsm8k", "--data", str(no_number)], "holds no number"),
        (["--tasks", "gsm8k", "--few-shot", "9"], "use 0..8"),
        (["--tasks", "gsm8k", "--limit", "0"], "limit = 0 must be >= 1"),
        (["--tasks", "speed", "--speed-repeats", "0"], "speed_repeats = 0 must be >= 1"),
        (["--tasks", "ppl", "--bootstrap", "-1"], "bootstrap = -1 must be >= 0"),
        (["--tasks", "speed", "--report", str(report)], "report and k go together"),
        (["--tasks", "speed", "--report", str(report), "--k", "4"], "available k: [2]"),
        (["--tasks", "gsm8k", "--skip-layers", "1"], "add speed to tasks"),
        (["--tasks", "speed", "--skip-layers", "1,x"], "not a list of integers"),
        (["--tasks", "humaneval", "--timeout", "0"], "must be > 0"),
        (["--tasks", "humaneval", "--sandbox-python", str(tmp / "nopython")], "not an executable file"),
    ]
    for extra, msg in cases:
        rc = run_cli(main, m + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, extra
        assert err and err[-1].startswith("error:") and msg in err[-1], (extra, err)
    assert not out.exists()
    r = subprocess.run([PY, EVAL, *m, "--tasks", "gsm8k,foo"], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: tasks: unknown task(s) foo; choose "
                                                                   "from gsm8k,humaneval,cruxeval,arithmetic,passkey,ppl,speed"]


def test_data_flag_and_all_tasks(tmp_path):
    """--data FILE goes to the one task that reads data; TASK=FILE keeps '=' in the path; 'all' = every task."""
    from rad_ds.core.cli import parse_config
    from rad_ds.eval.cli import FLAGS
    from rad_ds.eval.config import TASKS, EvalConfig

    def cfg(*args):
        return parse_config(EvalConfig, ["--model", "m", "--out", str(tmp_path / "o"), *args], None, FLAGS)

    assert cfg("--tasks", "humaneval", "--data", "x.jsonl").data == {"humaneval": "x.jsonl"}
    assert cfg("--data", "ppl=a=b.txt", "--tasks", "ppl").data == {"ppl": "a=b.txt"}
    assert cfg("--tasks", "all").validate(inputs_exist=False).tasks == list(TASKS)