"""Files written so that a failure never leaves a partial or unwanted one behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True):
    """Yield a temporary sibling of ``path`` to write; on success it is flushed to disk and renamed into
    place, on failure removed. Readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory of ``path`` to fill; on success it replaces ``path`` (an existing
    one is moved aside first and removed after), on failure it is removed. No half-written directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str, fsync: bool = True) -> Path:
    """Write ``text`` to a temporary sibling of ``path`` and rename it into place."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data, fsync: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n", fsync)


class ProvisionalDir:
    """An output directory that a run owns only once it has started its real work.

    Used as a context manager around a run's set-up: if the set-up fails (bad ``--data``, ``--layers``,
    ``--model``, ...) and the directory did not exist before, everything the run put there is removed, so a
    failed start leaves nothing behind. ``keep()`` marks the point after which the directory is the run's
    (checkpoints, metrics) and is never removed. Only the ``owner`` process (rank 0) removes anything."""

    def __init__(self, path: str | os.PathLike, owner: bool = True):
        self.path = Path(path)
        self.owner = owner
        self.existed = self.path.exists()
        self.kept = False

    def keep(self) -> None:
        self.kept = True

    def __enter__(self) -> "ProvisionalDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self.kept and not self.existed and self.owner:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


__all__ = ["ProvisionalDir", "atomic_path", "write_json_atomic", "write_text_atomic"]
