"""``rad-teacher-cache`` / ``launchers/teacher_cache.py``: the teacher-cache stage from the command line."""

from __future__ import annotations

import os

import torch

from rad_ds.core.cli import Flag, parse_config, run_cli

from .config import TeacherCacheConfig

FLAGS = {flag: Flag(key) for flag, key in {
    "--teacher": "teacher.path", "--gguf-file": "teacher.gguf_file", "--data": "data.path", "--out": "out",
    "--seq-len": "data.seq_len", "--k": "k", "--deepspeed": "teacher.deepspeed",
}.items()}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    cfg = parse_config(TeacherCacheConfig, argv, doc or __doc__, FLAGS)
    from .run import build_teacher_cache  # deferred: after parsing, so --help imports no transformers (~2 s)

    try:
        summary = build_teacher_cache(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.line())
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["FLAGS", "main", "run"]
