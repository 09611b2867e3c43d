"""``rad-placement`` / ``launchers/placement.py``: the placement study from the command line."""

from __future__ import annotations

from rad_ds.core.cli import Flag, parse_config, run_cli
from rad_ds.distill import FLAGS as DISTILL_FLAGS

from .config import StudyConfig

# the study's own flags, and the distillation's short flags routed into its distill section
FLAGS = {
    "--model": Flag("model.path"), "--k": Flag("k"), "--out": Flag("out"), "--report": Flag("report"),
    "--test": Flag("test"), "--heldout": Flag("heldout"), "--seeds": Flag("seeds"),
    **{flag: Flag("distill." + f.key) for flag, f in DISTILL_FLAGS.items()
       if flag in ("--data", "--steps", "--seq-len", "--micro-batch", "--grad-accum", "--lr")},
}


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    from .run import run_study  # deferred: rad-placement --help without optuna (diagnosis.search)

    cfg = parse_config(StudyConfig, argv, doc or __doc__, FLAGS)
    results = run_study(cfg)
    print(results.markdown())
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["FLAGS", "main", "run"]
