"""Distillation on DeepSpeed: teacher and student engines, losses, the loop, checkpoints, export.

``distill(DistillConfig)`` runs (or resumes) a run on every rank; ``export_checkpoint`` turns a checkpoint
into an HF directory. Submodules import DeepSpeed lazily, so ``rad_ds.distill.losses`` stays cheap.
"""

from __future__ import annotations


def __getattr__(name):
    if name in ("distill", "DistillResult"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("export_checkpoint", "load_checkpoint_model"):
        from . import export

        return getattr(export, name)
    raise AttributeError(name)


__all__ = ["DistillResult", "distill", "export_checkpoint", "load_checkpoint_model"]
