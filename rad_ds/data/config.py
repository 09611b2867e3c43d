"""``DataConfig``: the training data as every consumer of packed rows reads it (a distillation run's ``data``
section, a teacher cache's): where it is, its fields, and how documents become rows."""

from __future__ import annotations

from dataclasses import dataclass

from rad_ds.core.config import ConfigError, resolve_shipped, setting

from .packing import LONG_DOCUMENTS

PACKING = ("greedy", "none")
DATA_FORMATS = ("auto", "json", "parquet", "text", "hub")
_f = setting


@dataclass
class DataConfig:
    path: str | None = _f(None, "jsonl/json/parquet/txt file, a directory of them, or a hub dataset name")
    format: str = _f("auto", f"{', '.join(DATA_FORMATS)} (auto: from the file suffix)")
    split: str = _f("train", "split of a hub dataset")
    text_field: str = _f("text", "field holding plain text")
    messages_field: str = _f("messages", "field holding chat messages [{role, content}, ...]")
    seq_len: int = _f(512, "tokens per packed sequence")
    packing: str = _f("greedy", "greedy: whole documents best-fit into rows; none: one document per row")
    mask_prompt: bool = _f(True, "chat data: logit losses only on assistant tokens")
    add_eos: bool = _f(True, "append EOS to plain-text documents")
    max_documents: int | None = _f(None, "use at most this many documents")
    min_tokens: int = _f(2, "drop documents with fewer tokens (after templating)")
    shuffle: bool = _f(True, "shuffle rows each epoch (seeded by train.seed and the epoch)")
    long_documents: str = _f("split", "documents longer than data.seq_len: split (into seq_len pieces, each a "
                                      "document of its own) or truncate (keep the first seq_len tokens)")
    num_proc: int | None = _f(None, "processes that tokenise the data (default: min(cpu count, 8), at most one "
                                    "per 1000 records; 1: no multiprocessing)")

    def check(self) -> None:
        """The data settings every consumer of packed rows needs (a run, a teacher cache): a path, resolved
        when it names a shipped file, and rows of at least two tokens."""
        if not self.path:
            raise ConfigError("data.path is not set: give --data FILE (jsonl/parquet/txt) or a hub dataset name")
        if resolve_shipped(self.path).exists():
            self.path = str(resolve_shipped(self.path))
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len = {self.seq_len} must be >= 2 (a token and its successor)")


__all__ = ["DATA_FORMATS", "LONG_DOCUMENTS", "PACKING", "DataConfig"]
