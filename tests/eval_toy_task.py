"""A toy evaluation task for tests/test_eval_registry.py: what a newcomer's one new file (``rad_ds/eval/<task>.py``)
holds. It imports no config, so a plug-in can register it before ``rad_ds.eval.config`` builds its help texts."""

from __future__ import annotations

import random

from rad_ds.eval.registry import TaskSpec
from rad_ds.eval.tasks import GenerationTask, Sample


class ReverseTask(GenerationTask):
    """The toy task (what a newcomer's one new file would hold): reverse a two-digit number's digits; the answer
    is the output's first word, compared exactly."""

    name = "reverse"
    metric = "exact_match"
    default_max_new_tokens = 4
    plain_stop = ("\n",)
    takes_data = False  # generates its samples; its registry entry's data is None

    def __init__(self, samples: int = 10):
        if samples > 90:
            raise ValueError(f"reverse: {samples} samples asked; there are only 90 two-digit numbers")
        self.samples = samples

    @classmethod
    def from_config(cls, cfg) -> ReverseTask:
        return cls(cfg.limit or 10)

    def source(self, data):
        return "generated: two-digit numbers (tests/eval_toy_task.py)"

    def load(self, data, limit, seed):
        words = [str(w) for w in random.Random(seed).sample(range(10, 100), self.samples)]
        return [Sample(i, [{"role": "user", "content": f"Reverse the word: {w}"}], f"Reverse the word: {w}\nA:",
                       w[::-1], {"word": w}) for i, w in enumerate(words)]

    def score(self, samples, outputs, chat, sandbox=None):
        return [{"index": s.index, "correct": first_word(o) == s.target, "target": s.target, "word": s.meta["word"]}
                for s, o in zip(samples, outputs)]


def first_word(text: str) -> str | None:
    return text.split()[0] if text.split() else None


def reverse_spec() -> TaskSpec:
    """The registry entry: generation, one line of what it is, no data file, the class."""
    return TaskSpec("generation", "reverse a number's digits, exact match, generated", None, ReverseTask)
