"""Build a cache directory once, safely, however many processes, ranks and nodes want it at once.

The directory is built by exactly one process at a time (a ``filelock`` lock file beside it, the
mechanism transformers and datasets use), into a temporary sibling that is renamed into place, and is
trusted only once it holds its completeness marker. A directory without the marker (an import killed
before this design, or by hand) or with a marker for another source is rebuilt, never read. Readers of
a complete directory take no lock. Works on a filesystem shared by several nodes where ``flock`` does
(local disks, NFSv4, Lustre/GPFS mounted with locking).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

MARKER = ".rad_ds_complete.json"


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_complete(path: str | os.PathLike, key: dict | None = None) -> bool:
    """``path`` holds a finished build (for ``key``, when given)."""
    m = _marker(Path(path))
    return m is not None and (key is None or m.get("key") == key)


def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}.lock"


def build_once(path: str | os.PathLike, build: Callable[[Path], None], key: dict | None = None,
               timeout_s: float = 3600.0, what: str = "cache") -> bool:
    """Make ``path`` a complete build of ``build(tmp_dir)``; True when this process built it.

    ``key`` describes the source (e.g. file name and size); a complete directory made from another key is
    replaced. Waits up to ``timeout_s`` for a build running in another process."""
    path = Path(path)
    if is_complete(path, key):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(path)), timeout=timeout_s)
    try:
        with lock:
            if is_complete(path, key):  # another process finished it while this one waited
                return False
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            if path.exists():
                logger.warning("%s %s is incomplete or was built from another source: rebuilding it", what, path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            try:
                build(tmp)
                meta = {"key": key, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
                (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
                if path.exists():
                    old = path.parent / f".{path.name}.tmp-old-{os.getpid()}"
                    path.rename(old)
                    shutil.rmtree(old, ignore_errors=True)
                tmp.rename(path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except Timeout:
        raise TimeoutError(
            f"{what} {path}: waited {timeout_s:.0f} s for another process building it (lock {lock.lock_file}); "
            "if no rad-ds process is running, delete the lock file and retry"
        ) from None
    return True


__all__ = ["MARKER", "build_once", "is_complete", "lock_path"]
