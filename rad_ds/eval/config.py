"""``EvalConfig``: the evaluation stage's settings (models, tasks, data, decoding and sandbox limits)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rad_ds.core.config import Config, ConfigError, at_least, setting
from rad_ds.core.dtypes import NAMES_32_16 as DTYPES

GENERATION_TASKS = ("gsm8k", "humaneval", "cruxeval")
TASKS = GENERATION_TASKS + ("ppl", "speed")


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names lower-cased; ``all`` is every task."""
    tasks = [t.lower() for t in tasks]
    return list(TASKS) if tasks == ["all"] else tasks


@dataclass
class EvalConfig(Config):
    models: list[str] = setting([], "model dirs, .gguf files or embedded:smollm2, side by side (--model, repeatable)")
    out: str | None = setting(None, "output directory (results.json, results.md, samples/)")
    overwrite: bool = setting(False, "replace a finished evaluation in out (its results and samples/)")
    tasks: list[str] = setting(["gsm8k", "humaneval", "ppl"], f"comma list of {','.join(TASKS)}, or all")
    data: dict[str, str] = setting({}, "TASK=FILE: local jsonl/json/parquet/csv/txt for a task (gsm8k: question, "
                                       "answer '#### N'; humaneval: task_id, prompt, entry_point, test; cruxeval: "
                                       "code, input, output; ppl: text; speed: prompts)")
    limit: int | None = setting(None, "first N samples of each task (ppl: documents)")
    few_shot: int = setting(0, "GSM8K chain-of-thought exemplars (0-8)")
    max_new_tokens: int | None = setting(None, "generated tokens per sample (unset: per task, gsm8k 256, "
                                               "humaneval 384, cruxeval 64, speed 64)")
    batch_size: int = setting(8, "prompts per generate() call (left-padded)")
    chat: bool = setting(True, "apply the chat template when the tokenizer has one (--no-chat: plain prompts)")
    seed: int = setting(0, "seed of generated data (reasoning-gym) and prompt choice")
    dtype: str | None = setting(None, "fp32, bf16 or fp16 (unset: bf16 on CUDA, fp32 on CPU)")
    report: str | None = setting(None, "diagnosis report.json: speed also runs self-speculative decoding (with k)")
    k: int | None = setting(None, "with report: the k of the skip mask to use")
    skip_layers: list[int] | None = setting(None, "or an explicit draft mask of attention layers, e.g. 3,5,9")
    speed_prompts: int = setting(4, "prompts decoded by the speed task")
    draft_len: int = setting(4, "tokens drafted per round (speculative decoding)")
    ppl_window: int = setting(1024, "tokens per perplexity window (<= the model's context)")
    ppl_stride: int | None = setting(None, "perplexity window stride (unset: the window)")
    timeout: float = setting(10.0, "seconds per generated program in the sandbox")
    sandbox_memory_mb: int = setting(1024, "address-space limit of a generated program")
    sandbox_workers: int = setting(2, "generated programs run at once")
    sandbox_python: str | None = setting(None, "interpreter for generated code (unset: this one, or, as root, a "
                                                "system python3 that nobody can run, so the programs drop to nobody)")
    sandbox_disk_mb: int = setting(64, "everything a generated program may keep in its directory (a tmpfs)")
    wandb: bool = setting(False, "log to wandb (offline unless WANDB_MODE says otherwise)")
    wandb_project: str = setting("rad-ds", "wandb project")
    wandb_run: str | None = setting(None, "wandb run name")
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def validate(self, inputs_exist: bool = True) -> "EvalConfig":
        """``inputs_exist=False``: models and the report are written by earlier stages (checked when they run)."""
        from rad_ds.models.conversion import EMBEDDED

        self.tasks = expand_tasks(self.tasks)
        if not self.models:
            raise ConfigError("models is empty: give at least one --model")
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (results.json, results.md, samples/)")
        for m in self.models if inputs_exist else ():
            if m not in EMBEDDED and not Path(m).exists():
                raise FileNotFoundError(f"--model {m}: no such directory or file; give an HF model dir, a .gguf file "
                                        f"or one of {', '.join(EMBEDDED)}")
        self._check_tasks()
        at_least(self, ("limit", "max_new_tokens", "ppl_stride"), 1, optional=True)
        at_least(self, ("batch_size", "speed_prompts", "draft_len", "sandbox_workers"), 1)
        at_least(self, ("ppl_window",), 2)
        at_least(self, ("sandbox_memory_mb",), 64)
        at_least(self, ("sandbox_disk_mb",), 1)
        if self.ppl_stride is not None and self.ppl_stride > self.ppl_window:
            raise ConfigError(f"ppl_stride {self.ppl_stride} exceeds ppl_window {self.ppl_window}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout = {self.timeout}: must be > 0 seconds")
        self._check_mask(inputs_exist)
        if self.sandbox_python is not None and not os.access(self.sandbox_python, os.X_OK):
            raise FileNotFoundError(f"sandbox_python {self.sandbox_python}: not an executable file")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype = {self.dtype!r}: use one of {', '.join(DTYPES)}")
        from .gsm8k import Gsm8kTask

        Gsm8kTask(self.few_shot)  # checks the range
        return self

    def _check_tasks(self) -> None:
        if not self.tasks:
            raise ConfigError(f"tasks is empty; choose from {','.join(TASKS)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"tasks: unknown task(s) {','.join(bad)}; choose from {','.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks {','.join(self.tasks)}: a task is listed twice")
        for task, path in self.data.items():
            if task not in self.tasks:
                raise ConfigError(f"--data {task}={path}: task {task!r} is not in tasks {','.join(self.tasks)}")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--data {task}={path}: file not found")

    def _check_mask(self, inputs_exist: bool) -> None:
        if (self.report is None) != (self.k is None):
            raise ConfigError("report and k go together: the k-layer mask of a diagnosis report")
        if self.report and self.skip_layers:
            raise ConfigError("give either report/k or skip_layers, not both")
        if (self.report or self.skip_layers) and "speed" not in self.tasks:
            raise ConfigError("report/skip_layers are for the speed task; add speed to tasks")
        if inputs_exist and self.report and not Path(self.report).is_file():
            raise FileNotFoundError(f"--report {self.report}: file not found (a diagnosis report.json)")


def data_flag(values: list[str], cfg: EvalConfig) -> dict[str, str]:
    """``--data TASK=FILE`` pairs, or one bare ``--data FILE`` when exactly one of the tasks reads data."""
    out = dict(cfg.data)
    tasks = expand_tasks(cfg.tasks)
    given: dict[str, str] = {}
    for v in values:
        task, sep, path = v.partition("=")
        if sep and task.strip().lower() in TASKS:
            task = task.strip().lower()
        else:
            readers = [t for t in tasks if t in TASKS]
            if len(readers) != 1:
                raise ConfigError(f"--data {v}: say which task it is for, e.g. --data gsm8k={v} "
                                  f"(tasks: {','.join(tasks)})")
            task, path = readers[0], v
        if task in given:
            raise ConfigError(f"--data: two files for {task} ({given[task]}, {path})")
        given[task] = path
    out.update(given)
    return out


__all__ = ["DTYPES", "EvalConfig", "GENERATION_TASKS", "TASKS", "data_flag", "expand_tasks"]
