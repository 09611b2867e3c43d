"""Files written so that a failure never leaves a partial or unwanted one behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling of ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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


__all__ = ["ProvisionalDir", "write_json_atomic", "write_text_atomic"]
