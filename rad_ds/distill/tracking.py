"""What a run reports, on rank 0: ``OUT/metrics.jsonl`` (one line per step), wandb (offline unless
``WANDB_MODE`` says otherwise), a tqdm bar, and a final summary."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
from pathlib import Path

import torch

from rad_ds.core.io import write_text_atomic
from rad_ds.core.progress import progress
from rad_ds.core.tracking import start_wandb

logger = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step`` (a resumed run continues the file where its checkpoint was)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def read_metrics(path: Path, last_step: int | None = None) -> list[dict]:
    """The rows of ``metrics.jsonl`` (up to ``last_step``), skipping a line cut by a kill."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if last_step is None or row.get("step", 0) <= last_step:
                rows.append(row)
    return rows


class Tracker:
    """No-op on ranks other than 0."""

    def __init__(self, out: Path, run_cfg, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.metrics_path = Path(out) / "metrics.jsonl"
        self._file = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.metrics_path, "a")
        if run_cfg.wandb.enabled:
            self._wandb = start_wandb(out, run_cfg.wandb.project, run_cfg.wandb.run or Path(out).name,
                                      run_cfg.to_dict(), "distill", resume="allow", id=_wandb_id(out))
        if run_cfg.log.progress:  # a bar on a terminal; without one (Slurm, nohup) a log line every 30 s
            self._bar = progress(total_steps, "distill", "step", initial=start_step)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)

    def close(self, summary: dict | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update(summary)
            self._wandb.finish()
        if self._file is not None:
            self._file.close()


def _wandb_id(out) -> str:
    """A stable run id per run directory, so a resumed run continues the same wandb run."""
    return hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:12]


__all__ = ["Tracker", "peak_memory_mb", "read_metrics", "truncate_metrics"]
