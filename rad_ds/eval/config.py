"""``EvalConfig``: the evaluation stage's settings (models, tasks, data, decoding and sandbox limits)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, at_least, section, setting
from rad_ds.core.dtypes import NAMES_32_16 as DTYPES
from rad_ds.core.sections import WandbConfig

from .registry import REGISTRY, Names

# live views of the registry: a task registered after this import is in them (the help texts below are not)
TASKS = Names()  # every task, in the registry's order (``all``)
GENERATION_TASKS = Names(kind="generation")
DATA_TASKS = Names(takes_data=True)  # tasks that read a --data file


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names lower-cased; ``all`` is every task."""
    tasks = [t.lower() for t in tasks]
    return list(TASKS) if tasks == ["all"] else tasks


@dataclass
class EvalConfig(Config):
    # the wandb section; the old names go next release. The models stay a list of paths with one dtype for all:
    # they are compared side by side, on the same settings
    RENAMED: ClassVar[dict[str, str]] = {"wandb_project": "wandb.project", "wandb_run": "wandb.run"}

    models: list[str] = setting([], "model dirs, .gguf files or embedded:smollm2, side by side (--model, repeatable)")
    out: str | None = setting(None, "output directory (results.json, results.md, samples/)")
    overwrite: bool = setting(False, "replace a finished evaluation in out (its results and samples/)")
    tasks: list[str] = setting(["gsm8k", "humaneval", "ppl"], "comma list of tasks, or all: "
                               + "; ".join(f"{n} ({s.what})" for n, s in REGISTRY.items()))
    data: dict[str, str] = setting({}, "TASK=FILE: local jsonl/json/parquet/csv/txt for a task ("
                                       + "; ".join(f"{n}: {REGISTRY[n].data}" for n in DATA_TASKS) + ")")
    limit: int | None = setting(None, "first N samples of each task (ppl: documents; passkey: per context and depth; "
                                      "an arithmetic_samples / passkey_samples that is set wins)")
    few_shot: int = setting(0, "GSM8K chain-of-thought exemplars (0-8)")
    max_new_tokens: int | None = setting(None, "generated tokens per sample (unset: per task, "
                                               + ", ".join(f"{n} {s.max_new_tokens}" for n, s in REGISTRY.items()
                                                           if s.max_new_tokens) + ")")
    arithmetic_samples: int | None = setting(None, "arithmetic: problems (unset: 200, or --limit if lower)")
    arithmetic_digits: int = setting(1, "arithmetic: digits per operand (operands 0 .. 10^digits - 1)")
    arithmetic_terms: int = setting(2, "arithmetic: operands per expression")
    arithmetic_operators: str = setting("+-*", "arithmetic: operators drawn from (of + - *)")
    passkey_contexts: list[int] = setting([512, 1024, 2048, 4096], "passkey: prompt lengths in the model's tokens "
                                          "(those over its positions minus the new tokens are skipped)")
    passkey_depths: list[float] = setting([0.0, 0.25, 0.5, 0.75, 1.0], "passkey: needle depths, fractions of the "
                                          "filler before the needle (0: first, 1: last)")
    passkey_samples: int | None = setting(None, "passkey: samples (keys) per context and depth (unset: 2, or --limit "
                                                "if lower)")
    batch_size: int = setting(8, "prompts per generate() call (left-padded)")
    chat: bool = setting(True, "apply the chat template when the tokenizer has one (--no-chat: plain prompts)")
    seed: int = setting(0, "seed of generated data (reasoning-gym) and prompt choice")
    dtype: str | None = setting(None, "fp32, bf16 or fp16 (unset: bf16 on CUDA, fp32 on CPU)")
    report: str | None = setting(None, "diagnosis report.json: speed also runs self-speculative decoding (with k)")
    k: int | None = setting(None, "with report: the k of the skip mask to use")
    skip_layers: list[int] | None = setting(None, "or an explicit draft mask of attention layers, e.g. 3,5,9")
    speed_prompts: int = setting(4, "prompts decoded by the speed task")
    draft_len: int = setting(4, "tokens drafted per round (speculative decoding)")
    speed_repeats: int = setting(5, "timed repeats of the speed prompts per model (median and interval over them)")
    speed_interleave: bool = setting(True, "time the models round-robin on the same prompts, all loaded at once "
                                           "(false: one model after another, when they do not fit together)")
    ppl_window: int = setting(1024, "tokens per perplexity window (<= the model's context)")
    ppl_stride: int | None = setting(None, "perplexity window stride (unset: the window)")
    bootstrap: int = setting(1000, "bootstrap resamples over documents for the perplexity interval (0: none)")
    timeout: float = setting(10.0, "seconds per generated program in the sandbox")
    sandbox_memory_mb: int = setting(1024, "address-space limit of a generated program")
    sandbox_workers: int = setting(2, "generated programs run at once")
    sandbox_python: str | None = setting(None, "interpreter for generated code (unset: this one, or, as root, a "
                                                "system python3 that nobody can run, so the programs drop to nobody)")
    sandbox_disk_mb: int = setting(64, "everything a generated program may keep in its directory (a tmpfs)")
    wandb: WandbConfig = section(WandbConfig)
    progress: bool = setting(True, "progress bars (--no-progress: none)")

    def validate(self, inputs_exist: bool = True) -> "EvalConfig":
        """``inputs_exist=False``: models and the report are written by earlier stages (checked when they run)."""
        from rad_ds.models.conversion import EMBEDDED  # deferred: rad-evaluate --help imports no transformers

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
        at_least(self, ("limit", "max_new_tokens", "ppl_stride", "arithmetic_samples", "passkey_samples"), 1,
                 optional=True)
        at_least(self, ("batch_size", "speed_prompts", "speed_repeats", "draft_len", "sandbox_workers"), 1)
        at_least(self, ("bootstrap",), 0)
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
        for name in self.tasks:  # each task checks its own settings (ranges, grids) now, not after model loading
            if REGISTRY[name].task is not None:
                try:
                    REGISTRY[name].build(self)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
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
            if task not in DATA_TASKS:
                raise ConfigError(f"--data {task}={path}: {task} generates its data and reads no file; tasks that "
                                  f"read one: {','.join(DATA_TASKS)}")
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
            readers = [t for t in tasks if t in DATA_TASKS]
            if len(readers) != 1:
                raise ConfigError(f"--data {v}: say which task it is for, e.g. --data gsm8k={v} "
                                  f"(tasks: {','.join(tasks)})")
            task, path = readers[0], v
        if task in given:
            raise ConfigError(f"--data: two files for {task} ({given[task]}, {path})")
        given[task] = path
    out.update(given)
    return out


__all__ = ["DATA_TASKS", "DTYPES", "EvalConfig", "GENERATION_TASKS", "TASKS", "data_flag", "expand_tasks"]
