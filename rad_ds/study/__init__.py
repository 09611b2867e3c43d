"""The placement study: does RAD's choice of layers beat fixed placements at an equal distillation budget?
One student per placement method, the same recipe for each, scored on held-out data (``launchers/placement.py``)."""

from __future__ import annotations


def __getattr__(name):
    if name in ("run_study", "Study"):
        from . import run  # deferred: lazy attribute (PEP 562), so rad-placement --help skips optuna, the stages

        return getattr(run, name)
    if name == "StudyConfig":
        from .config import StudyConfig  # deferred: lazy attribute (PEP 562), as above

        return StudyConfig
    raise AttributeError(name)


__all__ = ["Study", "StudyConfig", "run_study"]
