"""``rad-diagnose`` / ``launchers/diagnose.py``: the diagnosis stage from the command line."""

from __future__ import annotations

from rad_ds.core.cli import Flag, parse_config, run_cli

from .config import DiagnoseConfig

FLAGS = {"--no-chat": Flag("chat", const=False, help="do not apply the chat template"),
         "--gguf-file": Flag("model.gguf_file")}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    from .run import diagnose  # deferred: rad-diagnose --help without optuna (diagnosis.search)

    diagnose(parse_config(DiagnoseConfig, argv, doc or __doc__, FLAGS, required=("model.path", "k", "out")))
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["main", "run"]
