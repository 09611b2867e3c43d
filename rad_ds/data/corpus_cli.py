"""``launchers/corpus.py``: build the distillation corpus from the command line."""

from __future__ import annotations

from rad_ds.core.cli import Flag, parse_config, run_cli

from .corpus_config import CorpusConfig

FLAGS = {flag: Flag(key) for flag, key in {
    "--teacher": "teacher.path", "--gguf-file": "teacher.gguf_file", "--out": "out",
    "--max-new-tokens": "generation.max_new_tokens", "--batch-size": "generation.batch_size",
}.items()}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    from .corpus import build_corpus  # deferred: rad-corpus --help without transformers and the models (~1-3 s)

    cfg = parse_config(CorpusConfig, argv, doc or __doc__, FLAGS, required=("out",))
    print(build_corpus(cfg).line())
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["FLAGS", "main", "run"]
