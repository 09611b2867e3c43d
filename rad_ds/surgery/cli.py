"""``rad-replace`` / ``launchers/replace.py``: the replace stage from the command line."""

from __future__ import annotations

from rad_ds.core.cli import Flag, parse_config, run_cli

from .config import ReplaceConfig
from .run import replace

FLAGS = {"--gguf-file": Flag("model.gguf_file")}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    cfg = parse_config(ReplaceConfig, argv, doc or __doc__, FLAGS, required=("model.path", "out"))
    record = replace(cfg)
    print(f"replaced layers {record.layers} (init={record.init}) -> {cfg.out}")
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["FLAGS", "main", "run"]
