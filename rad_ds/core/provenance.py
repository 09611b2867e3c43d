"""Where a result came from: commit (and whether the tree was dirty), the command line, the date, package versions
and the machine, recorded in every results JSON so that anyone can regenerate it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "optuna", "mamba-ssm", "rad-ds")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "command": shlex.join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), **versions},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count()}}


__all__ = ["provenance"]
