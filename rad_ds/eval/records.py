"""Read evaluation records from a local file: JSON lines, a JSON array, parquet or csv (``.txt``: one
record per blank-line-separated paragraph, field ``text``). Errors name the file, the line or field, and
what to do. No ``datasets`` cache is written, so ranks can read the same file at once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def read_records(path: str | Path, required: tuple[str, ...] = (), what: str = "--data") -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: file not found")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{what} {p}: unknown format {suffix or '(no suffix)'!r}; use {', '.join(FORMATS)}")
    if p.stat().st_size == 0:
        raise ValueError(f"{what} {p}: the file is empty")
    if suffix == ".parquet":
        rows = _parquet(p, what)
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".txt":
        text = p.read_text(encoding="utf-8", errors="replace")
        rows = [{"text": para.strip()} for para in text.split("\n\n") if para.strip()]
    else:
        rows = _json(p, what)
    if not rows:
        raise ValueError(f"{what} {p}: no records")
    for i, r in enumerate(rows):
        missing = [f for f in required if f not in r or r[f] is None]
        if missing:
            have = ", ".join(sorted(r)) or "none"
            raise ValueError(f"{what} {p} record {i + 1}: missing field(s) {', '.join(missing)} (it has: {have}); "
                             f"each record needs {', '.join(required)}")
    return rows


def _json(p: Path, what: str) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {p}: not a valid JSON array ({e.msg}, line {e.lineno})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} {p} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{what} {p} record {n}: a record must be a JSON object, got {type(r).__name__}")
    return rows


def _parquet(p: Path, what: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for unreadable files
        raise ValueError(f"{what} {p}: cannot read it as parquet ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


__all__ = ["FORMATS", "read_records"]
