"""The one wandb start for every stage: rank 0 only, offline unless ``WANDB_MODE`` says otherwise,
never stopping the run it logs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def start_wandb(out: str | Path, project: str, name: str | None, config: dict, job_type: str, **kw):
    """A wandb run writing under ``out`` (created), or ``None`` with a warning when wandb cannot start."""
    try:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(out).mkdir(parents=True, exist_ok=True)
        return wandb.init(project=project, name=name, dir=str(out), config=config, job_type=job_type, **kw)
    except Exception as e:  # noqa: BLE001 - logging must not stop the work it logs
        logger.warning("wandb disabled: %s", e)
        return None


__all__ = ["start_wandb"]
