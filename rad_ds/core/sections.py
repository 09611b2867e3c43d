"""The sections every stage config shares, declared once: ``ModelRef`` (which model: its path, the GGUF file
inside it, the dtype it runs in) and ``WandbConfig`` (experiment tracking). Each names a primary field, so
``--model DIR`` / ``model: DIR`` set ``model.path`` and ``--wandb`` / ``wandb: true`` set ``wandb.enabled``.
A stage gives its own defaults and help texts with ``section(ModelRef, path=..., help={...})``; a section with
more settings (the distillation teacher) subclasses ``ModelRef``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import setting


@dataclass
class ModelRef:
    """A model: an HF directory, a .gguf file (or a directory and the GGUF file in it), or ``embedded:smollm2``."""

    PRIMARY: ClassVar[str] = "path"

    path: str | None = setting(None, "model: HF dir, .gguf file or embedded:smollm2")
    gguf_file: str | None = setting(None, "GGUF file name inside path (when path is a directory)")
    dtype: str | None = setting(None, "weights and compute dtype: float32, bfloat16, float16 (unset: bfloat16 on "
                                      "CUDA, float32 on CPU)")

    @property
    def source(self) -> str:
        """``path``, or ``path/gguf_file``: what a report or a record names as the model."""
        return str(self.path) if self.gguf_file is None else f"{self.path}/{self.gguf_file}"

    def apply_to(self, other: ModelRef) -> None:
        """Join a stage to this model: ``other`` takes its path and GGUF file, and its dtype when this one sets
        one (unset: ``other`` keeps its own, the stage's default)."""
        other.path, other.gguf_file = self.path, self.gguf_file
        if self.dtype is not None:
            other.dtype = self.dtype


@dataclass
class WandbConfig:
    """Weights & Biases logging of a stage, on rank 0 (``rad_ds.core.tracking.start_wandb``)."""

    PRIMARY: ClassVar[str] = "enabled"

    enabled: bool = setting(False, "log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    project: str = setting("rad-ds", "wandb project")
    run: str | None = setting(None, "wandb run name")


__all__ = ["ModelRef", "WandbConfig"]
