"""What the GPU check writes: atomic files (a kill at any moment leaves the old file or the new one) and the
tarballs that come back from the device (under its 16 MiB per file). Standard library only."""

from __future__ import annotations

import datetime
import os
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

MAX_OUT_FILES = 6
FILE_LIMIT = 16 * 2**20 - 2**18  # what comes back: 16 MiB a file; a margin for the tar/gzip framing


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def rounded(x, digits: int = 4):
    """Floats to ``digits`` significant digits, through dicts and lists (figures, not measurement noise)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def write_atomic(path: Path, data: bytes) -> None:
    """Readers (and a kill at any moment) see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    write_atomic(dst, src.read_bytes())


def pack(src: Path, dst: Path, arcname: str, limit: int = FILE_LIMIT, level: int = 6) -> list[str]:
    """``src`` as a .tar.gz at ``dst`` (atomically) under ``limit`` bytes; if it does not fit, the largest files are
    left out (at most three tries, each sized by the compression ratio of the last); returns what was left out."""
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    left_out: list[str] = []
    for _ in range(3):
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)
        try:
            with tarfile.open(tmp, "w:gz", compresslevel=level) as tar:
                for p in files:
                    tar.add(p, arcname=f"{arcname}/{p.relative_to(src)}")
            size = os.path.getsize(tmp)
            if size <= limit or not files:
                os.replace(tmp, dst)
                return left_out
        finally:
            Path(tmp).unlink(missing_ok=True)
        raw = sum(p.stat().st_size for p in files) or 1
        keep = 0.85 * limit * raw / size  # raw bytes that should compress under the limit
        while files and sum(p.stat().st_size for p in files) > keep:
            left_out.append(str(files.pop().relative_to(src)))
    return left_out + [str(p.relative_to(src)) for p in files]  # did not fit: nothing packed


class Log:
    """Everything printed goes to the terminal (the device reply's tail) and to ``gpu_check.log``."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.f.write(line + "\n")
