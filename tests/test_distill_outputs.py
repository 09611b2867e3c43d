"""A distillation run's --out over its whole life, through the launcher: a finished run is never silently
replaced, a second run on the same --out is refused, a kill during the final export is finished by --resume
auto, a kill before the first checkpoint does not duplicate metrics, a checkpoint whose files changed is
refused in favour of the newest one that verifies, and bad files get one line. The oracles: the bytes of what
was there before, and an uninterrupted run of the same settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rad_ds.core.logs import LOG_FILE
from rad_ds.core.outputs import LOCK, MARKER
from tests.distill_helpers import (
    assert_same_steps,
    launcher,
    load_launcher,
    metrics,
    python,
    run,
    run_args,
    save_base,
    write_text_jsonl,
)

L = load_launcher("distill")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill_outputs")
    return save_base(d), write_text_jsonl(d / "text.jsonl", n=48), d


def _cli(args, capsys):
    from rad_ds.core.cli import run_cli

    rc = run_cli(L.main, list(map(str, args)))
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    return rc, (err[-1] if err else ""), cap.out


def _distill(args):
    from rad_ds.distill import distill

    return distill(L.make_config(list(map(str, args))))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (LOCK, MARKER, LOG_FILE)}


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()), k


def test_a_finished_run_is_never_silently_replaced(base, tmp_path, capsys):
    b, text, _ = base
    out = tmp_path / "run"
    args = run_args(tmp_path, b, text, out, steps=2)
    assert _cli(args, capsys)[0] == 0
    assert json.loads((out / MARKER).read_text())["status"] == "complete"
    before = _tree(out)
    rc, line, _ = _cli(args, capsys)
    assert rc == 2 and line.startswith(f"error: --out {out} holds a finished distillation run; pass --overwrite")
    assert _tree(out) == before
    # its checkpoints deleted to save space: still a finished run, not a new one
    import shutil

    shutil.rmtree(out / "checkpoints")
    before = _tree(out)
    rc, line, _ = _cli(args, capsys)
    assert rc == 2 and "holds a finished distillation run" in line
    rc, _, stdout = _cli(args + ["--resume", "auto"], capsys)
    assert rc == 0 and "nothing to do" in stdout
    rc, line, _ = _cli(run_args(tmp_path, b, text, out, steps=4) + ["--resume", "auto"], capsys)
    assert rc == 2 and "no checkpoint left to continue from; pass --overwrite" in line
    assert _tree(out) == before
    # another stage's output (the exported student in final/) is refused, even with --overwrite
    for extra in ([], ["--overwrite"]):
        rc, line, _ = _cli(run_args(tmp_path, b, text, out / "final", steps=2) + extra, capsys)
        assert rc == 2 and "holds an exported model; choose another --out" in line
    assert _tree(out) == before
    # --overwrite: a new run, whose metrics are its own
    rc, _, _ = _cli(args + ["--overwrite"], capsys)
    assert rc == 0
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "checkpoints").is_dir() and not [p for p in out.iterdir() if p.name.startswith(".previous")]


def test_a_second_run_on_the_same_out_is_refused(base, tmp_path, capsys):
    b, text, _ = base
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rad_ds.core.outputs import claim; o = claim(sys.argv[1], 'distill');"
         " print('claimed', flush=True); sys.stdin.readline()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        rc, line, _ = _cli(run_args(tmp_path, b, text, out, steps=2) + ["--resume", "auto"], capsys)
        assert rc == 2 and f"is in use by pid {holder.pid}" in line
        assert _tree(out) == {}  # nothing written beside the holder's lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_kill_during_the_final_export_is_finished_by_resume(base, tmp_path):
    b, text, _ = base
    out = tmp_path / "killed"
    args = run_args(tmp_path, b, text, out, steps=3, checkpoint__every=3)
    r = run([python(), launcher("distill.py"), *args], RAD_DS_FAULT="kill@export_written:step=3")
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".final.tmp-")]  # what the kill left
    assert json.loads((out / MARKER).read_text())["status"] == "running"
    result = _distill(args + ["--resume", "auto"])
    assert result.export == out / "final" and result.summary["finished_after_interruption"]
    assert (out / "summary.json").is_file() and not [p for p in out.iterdir() if ".tmp" in p.name]
    assert json.loads((out / MARKER).read_text())["status"] == "complete"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    # the export equals an uninterrupted run's
    whole = _distill(run_args(tmp_path, b, text, tmp_path / "whole", steps=3, checkpoint__every=3))
    _same_weights(out / "final", whole.export)


def test_kill_before_the_first_checkpoint_does_not_repeat_metrics(base, tmp_path):
    b, text, _ = base
    out = tmp_path / "early"
    args = run_args(tmp_path, b, text, out, steps=3, checkpoint__every=3)
    r = run([python(), launcher("distill.py"), *args], RAD_DS_FAULT="kill@step_end:step=2")
    assert r.returncode == -9, r.stderr[-3000:]
    assert [row["step"] for row in metrics(out)] == [1]  # the kill point comes before step 2's row is logged
    result = _distill(args)  # nothing to resume from: the same command starts it again
    assert result.start_step == 0
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]


def _largest(tag_dir: Path) -> Path:
    return max((p for p in tag_dir.rglob("*.pt")), key=lambda p: p.stat().st_size)


def test_a_checkpoint_that_does_not_verify_falls_back(base, tmp_path, caplog, capsys):
    b, text, _ = base
    out = tmp_path / "corrupt"
    short = run_args(tmp_path, b, text, out, steps=4, checkpoint__every=2, checkpoint__keep=2)
    _distill(short)
    complete = json.loads((out / "checkpoints" / "step_00000004" / "COMPLETE").read_text())
    f = _largest(out / "checkpoints" / "step_00000004")
    rel = str(f.relative_to(out / "checkpoints" / "step_00000004"))
    assert complete["files"][rel]["size"] == f.stat().st_size  # COMPLETE proves each file
    # truncated: resumed from step 2, and steps 3..6 equal an uninterrupted run's
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    longer = run_args(tmp_path, b, text, out, steps=6, checkpoint__every=2, checkpoint__keep=2)
    with caplog.at_level(logging.WARNING):
        resumed = _distill(longer + ["--resume", "auto"])
    assert resumed.start_step == 2
    assert f"step_00000004 does not verify: {rel} has" in caplog.text
    reference = _distill(run_args(tmp_path, b, text, tmp_path / "ref", steps=6, checkpoint__every=2))
    assert_same_steps(resumed.losses, reference.losses, steps=[3, 4, 5, 6])
    _same_weights(out / "final", reference.export)
    # same size, changed bytes (what a bad disk or a stray write does): refused too
    f = _largest(out / "checkpoints" / "step_00000006")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = _distill(run_args(tmp_path, b, text, out, steps=7, checkpoint__every=2, checkpoint__keep=2)
                           + ["--resume", "auto"])
    assert resumed.start_step == 4 and "step_00000006 does not verify" in caplog.text and "CRC-32" in caplog.text
    # nothing verifies: one line, nothing changed
    for tag in (out / "checkpoints").glob("step_*"):
        g = _largest(tag)
        g.write_bytes(g.read_bytes()[:100])
    before = _tree(out)
    rc, line, _ = _cli(run_args(tmp_path, b, text, out, steps=9) + ["--resume", "auto"], capsys)
    assert rc == 2 and line.startswith(f"error: no checkpoint in {out / 'checkpoints'} verifies")
    assert _tree(out) == before


def test_bad_files_are_one_line(base, tmp_path, capsys):
    b, text, _ = base
    from rad_ds.core.cli import run_cli

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(b, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])
    want = f"error: {w}: truncated or corrupt safetensors file"
    rc, line, _ = _cli(run_args(tmp_path, broken, text, tmp_path / "o1", steps=2), capsys)
    assert rc == 2 and line.startswith(want), line
    for name, args in (("replace", ["--model", broken, "--layers", "1", "--out", tmp_path / "o2"]),
                       ("generate", ["--model", broken, "--prompt", "hi", "--max-new-tokens", "2"]),
                       ("evaluate", ["--model", broken, "--tasks", "ppl", "--data", f"ppl={text}", "--limit", "2",
                                     "--out", tmp_path / "o3"])):
        rc = run_cli(load_launcher(name).main, list(map(str, args)))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len([e for e in err if e.startswith("error:")]) == 1 and err[-1].startswith(want), \
            (name, err[-5:])
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    # a DeepSpeed config DeepSpeed's own schema refuses: the file and the field
    ds = tmp_path / "stage_three.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": "three"}, "train_micro_batch_size_per_gpu": "auto"}))
    rc, line, _ = _cli(run_args(tmp_path, b, text, tmp_path / "o4", steps=2) + ["--deepspeed", ds], capsys)
    assert rc == 2 and line.startswith(f"error: DeepSpeed config {ds}: zero_optimization.stage = 'three'"), line
    assert not (tmp_path / "o4").exists()
