"""What every generation task provides to the runner: its samples, their prompts, and their scores.

A task turns records into :class:`Sample` s (a prompt as chat messages and as plain text, and a target);
the runner generates greedily for every sample, and the task scores the outputs. Tasks know nothing of
models, batching or ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rad_ds.core.intervals import wilson_interval


@dataclass
class Sample:
    index: int  # position in the task's data (the order of results and samples files)
    messages: list[dict]  # the prompt as a chat (used when the tokenizer has a chat template)
    text: str  # the prompt as plain text (base models, --no-chat)
    target: object  # what scoring compares against
    meta: dict = field(default_factory=dict)


class GenerationTask:
    name: str = ""
    metric: str = ""
    default_max_new_tokens: int = 256
    plain_stop: tuple[str, ...] = ()  # stop strings for plain-text prompting (chat: the EOS token ends it)
    takes_data: bool = True  # reads a --data file (False: generates its samples); its registry entry's data agrees
    batch_tokens: int | None = None  # cap on prompt tokens per batch (long prompts: fewer of them at a time)
    chat_prompts: bool = True  # False: a completion task, plain-text prompts even under a chat template

    @classmethod
    def from_config(cls, cfg) -> "GenerationTask":
        """The task as an ``EvalConfig`` sets it up (its task-specific settings)."""
        return cls()

    def load(self, data: str | None, limit: int | None, seed: int) -> list[Sample]:
        raise NotImplementedError

    def prepare(self, samples: list[Sample], tokenizer, chat: bool, max_prompt_tokens: int | None) -> list[Sample]:
        """The samples for one model, once its tokenizer is known (prompts whose length is set in that model's
        tokens are built here); ``max_prompt_tokens``: its positions minus the new tokens. Default: unchanged."""
        return samples

    def rows(self, row: dict, records: list[dict]) -> list[dict]:
        """The results rows of one model: ``row`` (score, n, ci95 over all records) with the task's own fields
        and details added, and any further rows (e.g. one per context length)."""
        return [row]

    def figures(self, out, label: str, rows: list[dict], write: bool = True) -> list:
        """Pictures of one model's rows in the evaluation's ``out`` (written only with ``write``: rank 0), named
        in the rows' details on every rank; their paths."""
        return []

    def source(self, data: str | None) -> str:
        """Where the samples come from, for the results."""
        raise NotImplementedError

    def score(self, samples: list[Sample], outputs: list[str], chat: bool, sandbox=None) -> list[dict]:
        """One record per sample: at least ``correct`` (bool); JSON-serialisable."""
        raise NotImplementedError


def accuracy(records: list[dict]) -> tuple[float, float]:
    """Mean of ``correct`` and its standard error (sample std / sqrt(n), as lm-evaluation-harness)."""
    n = len(records)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(bool(r["correct"]) for r in records) / n
    se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return p, se


def accuracy_interval(records: list[dict]) -> list[float] | None:
    """The accuracy's 95% Wilson interval ``[lo, hi]`` (None without records)."""
    if not records:
        return None
    return list(wilson_interval(sum(bool(r["correct"]) for r in records), len(records)))


def outcomes(records: list[dict], key: str) -> dict[str, int]:
    """How many records have each value of ``key`` (how the verdicts came about), sorted by value."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r[key]] = counts.get(r[key], 0) + 1
    return dict(sorted(counts.items()))


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the first stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


__all__ = ["GenerationTask", "Sample", "accuracy", "accuracy_interval", "cut_at_stop", "outcomes"]
