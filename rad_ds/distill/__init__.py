"""Distillation on DeepSpeed: teacher and student engines, losses, the loop, checkpoints, export.

The stage's public face, what other packages (the study, the pipeline) may use; everything else in ``distill/``
is its own business (tests/test_layout.py holds them to it):

* ``DistillConfig`` (the stage config) and ``FLAGS`` (its command-line flags, which the study reuses);
* ``distill(DistillConfig)`` runs (or resumes) a run on every rank -> ``DistillResult``; ``RunSummary`` reads a
  run's ``summary.json``;
* ``export_checkpoint`` turns a checkpoint into an HF directory, ``load_checkpoint_model`` loads one as a model,
  ``consolidated_state_dict`` reads its weights whole.

Names resolve on first use, so ``import rad_ds.distill`` loads neither DeepSpeed nor the models.
"""

from __future__ import annotations

import importlib

_HOMES = {  # name -> the submodule that defines it
    "DistillConfig": "config", "FLAGS": "cli", "distill": "run", "DistillResult": "run", "RunSummary": "summary",
    "export_checkpoint": "export", "load_checkpoint_model": "export", "consolidated_state_dict": "export",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
