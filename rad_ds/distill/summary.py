"""``summary.json`` of a distillation run as a type: the one reader and writer of the file."""

from __future__ import annotations

import json
from pathlib import Path

from rad_ds.core.io import write_json_atomic


class RunSummary:
    """What a finished (or stopped) run did: steps, losses, tokens, speed, replaced layers, checkpoint."""

    FILE = "summary.json"

    def __init__(self, data: dict):
        self.data = data

    @classmethod
    def load(cls, out: str | Path) -> "RunSummary | None":
        """The summary in run directory ``out``; None when the run has not written one."""
        p = Path(out) / cls.FILE
        if not p.is_file():
            return None
        try:
            return cls(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg}); resume the run to rewrite it") from None

    def write(self, out: str | Path) -> Path:
        return write_json_atomic(Path(out) / self.FILE, self.data)

    @property
    def finished(self) -> bool:
        """Every step of ``train.steps`` ran."""
        return self.data.get("last_step") is not None and self.data.get("last_step") == self.data.get("steps")

    def __getitem__(self, key: str):
        return self.data[key]

    def get(self, key: str, default=None):
        return self.data.get(key, default)


__all__ = ["RunSummary"]
