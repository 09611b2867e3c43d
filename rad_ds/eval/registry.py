"""The evaluation tasks: one table, name -> what runs it and its flags. Config validation, ``--tasks``/``--data``
help, ``all``, the sandbox check and the runner's dispatch all read it, so a new task is a module with a
``GenerationTask`` subclass plus one line here.

``kind`` says which runner takes the task (``runner.KIND_RUNNERS``, one per kind): ``generation`` (greedy
generation scored per sample: ``run.run_generation_task`` with the task's ``GenerationTask``), ``ppl``
(``run.run_ppl``) or ``speed`` (``speed.SpeedTask``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .arithmetic import ArithmeticTask
from .cruxeval import CruxEvalTask
from .gsm8k import Gsm8kTask
from .humaneval import HumanEvalTask
from .passkey import PasskeyTask
from .tasks import GenerationTask

KINDS = ("generation", "ppl", "speed")


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # one of KINDS
    what: str  # one line for --help and the docs
    data: str | None  # what a --data TASK=FILE holds; None: the task reads no data (generated)
    task: type[GenerationTask] | None = None  # generation tasks: the class (``from_config`` builds it)
    is_code: bool = False  # runs model-written code (in the sandbox)

    def build(self, cfg) -> GenerationTask:
        if self.task is None:
            raise TypeError(f"a {self.kind} task has no GenerationTask")
        return self.task.from_config(cfg)

    @property
    def max_new_tokens(self) -> int | None:
        return self.task.default_max_new_tokens if self.task is not None else 64 if self.kind == "speed" else None


REGISTRY: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("generation", "GSM8K-style math word problems, exact match", "question, answer '#### N'",
                      Gsm8kTask),
    "humaneval": TaskSpec("generation", "HumanEval pass@1, code run in the sandbox",
                          "task_id, prompt, entry_point, test", HumanEvalTask, is_code=True),
    "cruxeval": TaskSpec("generation", "CRUXEval-style output prediction, pass@1", "code, input, output",
                         CruxEvalTask, is_code=True),
    "arithmetic": TaskSpec("generation", "short arithmetic expressions, exact match, generated", None,
                           ArithmeticTask),
    "passkey": TaskSpec("generation", "passkey retrieval by context and depth, exact match, generated", None,
                        PasskeyTask),
    "ppl": TaskSpec("ppl", "perplexity on documents", "text"),
    "speed": TaskSpec("speed", "decoding tokens/s, plain and self-speculative with a mask", "prompts"),
}


def check_registry() -> None:
    for name, spec in REGISTRY.items():
        if spec.kind not in KINDS:
            raise ValueError(f"task {name}: kind {spec.kind!r} is not one of {KINDS}")
        if (spec.kind == "generation") != (spec.task is not None):
            raise ValueError(f"task {name}: a generation task needs its GenerationTask class, others none")
        if spec.task is not None and spec.task.name != name:
            raise ValueError(f"task {name}: its class calls itself {spec.task.name!r}")


check_registry()

__all__ = ["KINDS", "REGISTRY", "TaskSpec"]
