"""Where a result came from: commit (and whether the tree was dirty), the command line, the date, package versions
and the machine, recorded in every results JSON so that anyone can regenerate it; and the one way a benchmark
writes its results (the JSON, then the ``.md`` rendered from that JSON alone, so ``SCRIPT --render`` re-creates
the ``.md`` byte for byte)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from .io import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "optuna", "mamba-ssm", "rad-ds")
KEYS = ("commit", "dirty", "command", "date", "versions", "machine")
RENDER_HELP = "only re-render the .md beside --out from that JSON (no benchmark runs)"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _device() -> str:
    """``cpu``, or the CUDA device's name when torch sees one (without importing torch if it is not loaded)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu"


def provenance(command: list[str] | None = None) -> dict:
    """``{"commit", "dirty", "command", "date", "versions", "machine"}`` of this process."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    argv = command if command is not None else [Path(sys.argv[0]).name if sys.argv[0] else "python", *sys.argv[1:]]
    try:
        argv0 = str(Path(sys.argv[0]).resolve().relative_to(REPO)) if command is None and sys.argv[0] else None
    except ValueError:
        argv0 = None
    if argv0:
        argv = ["python", argv0, *sys.argv[1:]]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "command": shlex.join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), **versions},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "device": _device(), "load_average": load}}


def provenance_line(p: dict) -> str:
    """One markdown line saying how the result was made (rendered into every results ``.md``)."""
    v, m = p.get("versions") or {}, p.get("machine") or {}
    pkgs = ", ".join(f"{k} {v[k]}" for k in ("torch", "deepspeed", "transformers") if v.get(k))
    where = ", ".join(x for x in (m.get("device"), f"{m['cpus']} CPUs" if m.get("cpus") else None) if x)
    if p.get("reconstructed"):  # added after the run: say what is known and where the JSON says how
        when = f"run on {p['date']}" if p.get("date") else "date of the run unknown"
        return (f"Provenance reconstructed after the run (`provenance.note` in the JSON): `{p['command']}`, last "
                f"written at commit {(p['commit'] or '?')[:10]} ({p.get('commit_date') or '?'}), {when}"
                + (f"; {pkgs}" if pkgs else "") + (f"; {where}" if where else "") + ".")
    load = m.get("load_average")
    return (f"Made by `{p['command']}` at commit {(p['commit'] or '?')[:10]}{' (dirty tree)' if p['dirty'] else ''} "
            f"on {p['date']}; {pkgs}; {where}" + (f" (load average {load[0]:.1f} at the end)" if load else "") + ".")


def write_results(out: str | Path, result: dict, render: Callable[[dict], str], indent: int = 2) -> Path:
    """Write ``result`` (which must hold its ``provenance``) to ``out`` and ``render(result)`` beside it as ``.md``."""
    out = Path(out)
    missing = [k for k in KEYS if k not in (result.get("provenance") or {})]
    if missing:
        raise ValueError(f"{out}: the result's provenance lacks {missing}; add 'provenance': provenance() to it")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=indent) + "\n")  # first: a render that fails loses no run
    return write_text_atomic(out.with_suffix(".md"), render(result))


def render_only(render: Callable[[dict], str], default_out: str | Path, argv: list[str] | None = None) -> bool:
    """``SCRIPT --render [--out FILE.json]``: re-render ``FILE.md`` from ``FILE.json`` and return True; False
    (nothing done) without ``--render``. Checked before the script's own parser, whose required flags a render
    does not need."""
    argv = sys.argv[1:] if argv is None else argv
    if "--render" not in argv:
        return False
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", default=str(default_out))
    a, _ = ap.parse_known_args(argv)
    out = Path(a.out)
    if not out.is_file():
        raise SystemExit(f"--render: {out} does not exist; run the benchmark first, or give --out FILE.json")
    md = write_text_atomic(out.with_suffix(".md"), render(json.loads(out.read_text())))
    print(f"rendered {md} from {out}")
    return True


__all__ = ["KEYS", "RENDER_HELP", "provenance", "provenance_line", "render_only", "write_results"]
