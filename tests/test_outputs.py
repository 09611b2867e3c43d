"""core.outputs, the --out discipline of every launcher: what is refused, what --overwrite does and undoes, the
lock between runs (held by a real second process), stale temporaries, a read-only --out. The distillation
run's lifecycle (finished, killed in export, corrupt checkpoints) is in test_distill_outputs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rad_ds.core.logs import LIBRARY, LOG_FILE
from rad_ds.core.outputs import LOCK, MARKER, OutputError, check, claim, kind_of

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict:
    """Every file under ``path`` but rad-ds' own lock and marker, with its bytes: the oracle of 'untouched'."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (LOCK, MARKER, LOG_FILE)}


def _finished(path: Path, kind: str, files: dict) -> Path:
    with claim(path, kind) as out:
        for name, text in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        out.finish()
    return path


def test_fresh_claim_marks_running_then_complete(tmp_path):
    out = tmp_path / "eval"
    with claim(out, "evaluation") as o:
        assert o.state == "fresh" and o.created
        assert json.loads((out / MARKER).read_text())["status"] == "running"
        (out / "results.json").write_text("{}")
        o.finish()
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "evaluation" and marker["status"] == "complete" and marker["pid"] == os.getpid()
    assert kind_of(out) == "evaluation"


def test_finished_output_is_refused_without_overwrite(tmp_path):
    out = _finished(tmp_path / "eval", "evaluation", {"results.json": "old", "samples/base/gsm8k.jsonl": "old"})
    before = _tree(out)
    with pytest.raises(OutputError, match=r"holds a finished evaluation; pass --overwrite"):
        claim(out, "evaluation")
    assert _tree(out) == before


def test_overwrite_replaces_only_when_the_new_output_finishes(tmp_path):
    out = _finished(tmp_path / "eval", "evaluation", {"results.json": "old", "samples/base/gsm8k.jsonl": "old"})
    before = _tree(out)
    # a run that fails: what it wrote goes, the previous output comes back whole
    with pytest.raises(RuntimeError, match="model failed"):
        with claim(out, "evaluation", overwrite=True):
            # the old files are aside (hidden, until the new output finishes), not beside the new ones
            assert [k for k in _tree(out) if not k.startswith(".previous.tmp-")] == []
            (out / "results.json").write_text("half")
            raise RuntimeError("model failed")
    assert _tree(out) == before
    assert json.loads((out / MARKER).read_text())["status"] == "complete"
    # a run that finishes: no file of the old output lingers (the old samples/ are gone)
    with claim(out, "evaluation", overwrite=True) as o:
        (out / "results.json").write_text("new")
        o.finish()
    assert _tree(out) == {"results.json": b"new"}
    assert not [p for p in out.iterdir() if p.name.startswith(".previous")]


def test_foreign_or_other_kind_is_refused_even_with_overwrite(tmp_path):
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("mine")
    diag = _finished(tmp_path / "diag", "diagnosis", {"report.json": "{}"})
    for path, what in ((home, "files that rad-ds did not write"), (diag, "a diagnosis")):
        before = _tree(path)
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=f"holds {what}; choose another --out"):
                claim(path, "evaluation", overwrite=overwrite)
        assert _tree(path) == before
        assert not (path / LOCK).exists() or path == diag  # nothing written into a foreign directory
    # outputs written before markers existed are recognised by their files
    old = tmp_path / "old_eval"
    old.mkdir()
    (old / "results.json").write_text("{}")
    assert kind_of(old) == "evaluation"
    with pytest.raises(OutputError, match="finished evaluation"):
        check(old, "evaluation")


def test_unfinished_output_of_a_dead_run(tmp_path):
    # not resumable (an evaluation): started again, its leftovers removed once the new one finishes
    out = tmp_path / "eval"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": "evaluation", "status": "running", "pid": 1}))
    (out / "samples").mkdir()
    (out / "samples" / "half.jsonl").write_text("x")
    with claim(out, "evaluation") as o:
        assert o.state == "fresh"
        o.finish()
    assert _tree(out) == {}
    # resumable (a distillation run): kept, to be continued; a dead writer's temporaries are removed
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"kind": "distill", "status": "running"}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / ".final.tmp-abc").mkdir()
    (run / ".final.tmp-abc" / "model.safetensors").write_text("partial")
    (run / ".metrics.jsonl.x1y2.tmp").write_text("partial")
    (run / "checkpoints" / ".latest.q.tmp").write_text("partial")
    with claim(run, "distill", resume=True) as o:
        assert o.state == "unfinished"
    assert _tree(run) == {"metrics.jsonl": b'{"step": 1}\n'}
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_failed_start_leaves_no_directory(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError):
        with claim(out, "diagnosis"):
            raise ValueError("bad --k")
    assert not out.exists()


_HOLDER = textwrap.dedent("""
    import sys
    from rad_ds.core.outputs import claim
    o = claim(sys.argv[1], "distill")
    print("claimed", flush=True)
    sys.stdin.readline()  # hold the lock until the parent closes our stdin (or kills us)
""")


def _holder(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "claimed"  # a handshake, not a sleep
    return p


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        with pytest.raises(OutputError, match=rf"in use by pid {p.pid} on \S+ \(since"):
            claim(out, "distill", resume=True)
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    with claim(out, "distill", resume=True) as o:  # released when the holder ended
        assert o.state == "unfinished"
    # a holder killed with SIGKILL leaves no stale lock: the kernel drops it with the process
    p = _holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    with claim(out, "distill", resume=True):
        pass


def test_a_file_or_an_unwritable_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file; give a directory"):
        claim(f, "evaluation")
    # a real read-only filesystem, mounted in a private user + mount namespace
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a read-only filesystem ({probe.stderr.decode().strip()})")
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import sys\nfrom rad_ds.core.cli import run_cli\nfrom rad_ds.core.outputs import claim, check\n"
            "sys.exit(run_cli(lambda a: claim(a[0], a[1]) and 0, sys.argv[1:]))")
    for kind in ("evaluation", "distill"):
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro,size=64k tmpfs "{ro}" && '
                            f'exec "{sys.executable}" -c \'{code}\' "{ro}/out" {kind}'],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [f"error: --out {ro}/out: cannot write there (Read-only file "
                                                 "system); choose a writable --out"]


def test_the_log_file_keeps_everything_the_console_drops(tmp_path):
    """A run's lines, DeepSpeed's and the library chatter go to OUT/rad_ds.log; the console skips the chatter."""
    import io
    import logging

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with claim(tmp_path / "eval", "evaluation") as o:
            logging.getLogger("rad_ds.eval").info("scored 3 of 4")
            logging.getLogger(LIBRARY + ".zero_to_fp32").info("Processing zero checkpoint")
            logging.getLogger("DeepSpeed").warning("a DeepSpeed warning")
            o.finish()
        logging.getLogger("rad_ds.eval").info("after the run")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    log = (tmp_path / "eval" / LOG_FILE).read_text()
    assert "scored 3 of 4" in log and "Processing zero checkpoint" in log and "a DeepSpeed warning" in log
    assert "after the run" not in log  # detached with the claim
    assert "scored 3 of 4" in console.getvalue() and "Processing zero checkpoint" not in console.getvalue()


def test_ranks_other_than_0_show_warnings_and_any_rank_events_only(tmp_path):
    """A launcher on rank 1: its INFO lines stay off the console (rank 0 says them), except an event that one
    process does for all (the embedded model's import), which shows whichever rank does it."""
    code = textwrap.dedent("""
        import logging
        from rad_ds.core.cli import ANY_RANK, run_cli
        def main(argv):
            log = logging.getLogger("rad_ds.test")
            log.info("an ordinary line")
            log.info("importing once", extra={ANY_RANK: True})
            log.warning("a warning")
        run_cli(main, [])
    """)
    for rank, want in (("0", ["an ordinary line", "importing once", "a warning"]),
                       ("1", ["importing once", "a warning"])):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": rank})
        lines = [line.split("] ", 1)[1] for line in r.stderr.splitlines() if line.startswith("[")]
        assert lines == want, (rank, r.stderr)
