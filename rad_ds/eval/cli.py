"""``rad-evaluate`` / ``launchers/evaluate.py``: the evaluation stage from the command line."""

from __future__ import annotations

from rad_ds.core.cli import Flag, parse_config, run_cli

from .config import EvalConfig, data_flag

FLAGS = {
    "--model": Flag("models", append=True, help="model dir, .gguf file or embedded:smollm2; repeat for side by side"),
    "--data": Flag("data", append=True, parse=data_flag,
                   help="[TASK=]FILE: local data for a task (a bare FILE when one task reads data); repeatable"),
    "--no-chat": Flag("chat", const=False, help="plain-text prompts even if the tokenizer has a chat template"),
    "--no-progress": Flag("progress", const=False, help="no progress bars"),
}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    from .run import evaluate  # deferred: rad-evaluate --help without transformers and the models (~1-3 s)

    evaluate(parse_config(EvalConfig, argv, doc or __doc__, FLAGS, required=("models", "out")))
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["main", "run"]
