"""Load training records with ``datasets``: local jsonl/json/parquet/text files (or a directory of
them), or a hub dataset name where a hub is reachable. Each record holds plain text
(``data.text_field``) or chat messages (``data.messages_field``, ``[{"role", "content"}, ...]``).

Bad input fails here, before any model is loaded, with one line naming the file (and line) and the fix.
Text files are split into documents at blank lines (``sample_by="paragraph"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rad_ds.core.records import SUFFIX_FORMATS, json_records


class DataError(ValueError):
    """Unusable training data; the message names the file or field and what to do."""


@dataclass
class Records:
    dataset: object  # datasets.Dataset
    kind: str  # "text" or "messages"
    field: str
    files: list[str]  # local files read (empty for a hub dataset)
    source: str


def resolve_files(path: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """(datasets builder name, files) for a local path; ``("hub", [])`` for a hub name."""
    p = Path(path)
    if not p.exists():
        if fmt in ("auto", "hub") and "/" in path and not path.startswith((".", "/")) and not Path(path).suffix:
            return "hub", []
        raise DataError(f"data.path {path}: file not found; give a jsonl/json/parquet/txt file or directory")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIX_FORMATS)
        if not files:
            raise DataError(f"data.path {path}: directory holds no {'/'.join(sorted(SUFFIX_FORMATS))} files")
    else:
        files = [p]
    builders = {SUFFIX_FORMATS.get(f.suffix.lower()) for f in files}
    if fmt != "auto":
        builder = fmt
    elif None in builders:
        raise DataError(
            f"data.path {path}: unknown file type {files[0].suffix!r}; use .jsonl/.json/.parquet/.txt or set "
            "data.format"
        )
    elif len(builders) > 1:
        raise DataError(f"data.path {path}: mixes file types {sorted(builders)}; put one type per directory")
    else:
        builder = builders.pop()
    return builder, files


def load_records(path: str, fmt: str = "auto", split: str = "train", text_field: str = "text",
                 messages_field: str = "messages", max_documents: int | None = None) -> Records:
    import datasets

    builder, files = resolve_files(path, fmt)
    if files and all(f.stat().st_size == 0 or (builder != "parquet" and not f.read_bytes().strip()) for f in files):
        raise DataError(f"data.path {path}: no records (empty file); give a non-empty dataset")
    try:
        if builder == "hub":
            ds = datasets.load_dataset(path, split=split)
        else:
            if builder == "json":
                for f in files:  # datasets' own errors on a broken file are pages long
                    json_records(f, "data.path", DataError)
            kw = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kw)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; keep one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = path if builder == "hub" else ", ".join(map(str, files[:3]))
        hint = ("; is the hub reachable (HF_DATASETS_OFFLINE)? give a local file" if builder == "hub"
                else f"; is it a valid {builder} file?")
        raise DataError(f"data.path {where}: could not be read ({type(e).__name__}: {msg[:200]}){hint}") from None
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    cols = ds.column_names
    if text_field in cols:
        kind, fld = "text", text_field
    elif messages_field in cols:
        kind, fld = "messages", messages_field
    else:
        raise DataError(
            f"data.path {path}: records have fields {cols}; expected {text_field!r} (data.text_field) or "
            f"{messages_field!r} (data.messages_field)"
        )
    if len(ds) == 0:
        raise DataError(f"data.path {path}: no records; give a non-empty dataset")
    return Records(ds, kind, fld, [str(f) for f in files], path)


__all__ = ["DataError", "Records", "load_records", "resolve_files"]
