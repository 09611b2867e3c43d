"""Read records from a local file: JSON lines, a JSON array, parquet or csv (``.txt``: one record per
blank-line-separated paragraph, field ``text``). Errors name the file, the line or field, and what to do.
No ``datasets`` cache is written, so ranks can read the same file at once. The one reader of small
record files (evaluation data, diagnosis prompts); the training corpus goes through ``datasets``
(``rad_ds/data/sources.py``), which shares the suffix table and the JSON check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".txt")
# suffix -> ``datasets`` builder, for the readers that go through datasets
SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                  ".text": "text", ".md": "text"}


def read_records(path: str | Path, required: tuple[str, ...] = (), what: str = "--data") -> list[dict]:
    """Every record of ``path`` as a dict; ``required`` fields must be present; ``what`` names the setting
    the path came from in errors (``--data gsm8k=F``, ``diagnose.prompts``)."""
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
        rows = json_records(p, what)
    if not rows:
        raise ValueError(f"{what} {p}: no records")
    for i, r in enumerate(rows):
        missing = [f for f in required if f not in r or r[f] is None]
        if missing:
            have = ", ".join(sorted(r)) or "none"
            raise ValueError(f"{what} {p} record {i + 1}: missing field(s) {', '.join(missing)} (it has: {have}); "
                             f"each record needs {', '.join(required)}")
    return rows


def json_records(p: Path, what: str = "--data", error: type[Exception] = ValueError) -> list[dict]:
    """The records of a JSON-lines file or a JSON array, each a JSON object; the first bad line is named.
    JSON lines are read line by line (a large training file is never held as one string)."""
    with open(p, "rb") as f:
        first = f.read(64).lstrip()[:1]
    rows: list = []
    try:
        if first == b"[":
            try:
                rows = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise error(f"{what} {p}: not a valid JSON array ({e.msg}, line {e.lineno})") from None
        else:
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise error(f"{what} {p} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {p}: not UTF-8 text ({e.reason} at byte {e.start}); is it a JSON lines file?") from None
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise error(f"{what} {p} line {n}: a record must be a JSON object, got {type(r).__name__}")
    return rows


def _parquet(p: Path, what: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for unreadable files
        raise ValueError(f"{what} {p}: cannot read it as parquet ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


__all__ = ["FORMATS", "SUFFIX_FORMATS", "json_records", "read_records"]
