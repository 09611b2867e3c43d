"""What every generation task provides to the runner: its samples, their prompts, and their scores.

A task turns records into :class:`Sample` s (a prompt as chat messages and as plain text, and a target);
the runner generates greedily for every sample, and the task scores the outputs. Tasks know nothing of
models, batching or ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
    takes_data: bool = True

    def load(self, data: str | None, limit: int | None, seed: int) -> list[Sample]:
        raise NotImplementedError

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


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the first stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


__all__ = ["GenerationTask", "Sample", "accuracy", "cut_at_stop"]
