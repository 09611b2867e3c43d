"""The evaluation tasks: one table, name -> what runs it and its flags. Config validation, ``--tasks``/``--data``
help, ``all``, the sandbox check and the runner's dispatch all read it, so a new task is a module with a
``GenerationTask`` subclass plus one line here (or ``register`` at run time: a plug-in, a test; docs/extending.md).
The checks and the dispatch read the table live (``Names``); the ``--help`` texts list it as it was when
``rad_ds.eval.config`` was imported.

``kind`` says which runner takes the task (``runner.KIND_RUNNERS``, one per kind): ``generation`` (greedy
generation scored per sample: ``run.run_generation_task`` with the task's ``GenerationTask``), ``ppl``
(``run.run_ppl``) or ``speed`` (``speed.SpeedTask``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rad_ds.core.live_names import LiveNames

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
    def takes_data(self) -> bool:
        return self.data is not None

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


def _check(name: str, spec: TaskSpec) -> None:
    if spec.kind not in KINDS:
        raise ValueError(f"task {name}: kind {spec.kind!r} is not one of {KINDS}")
    if (spec.kind == "generation") != (spec.task is not None):
        raise ValueError(f"task {name}: a generation task needs its GenerationTask class, others none")
    if spec.task is not None and spec.task.name != name:
        raise ValueError(f"task {name}: its class calls itself {spec.task.name!r}")
    if spec.task is not None and spec.task.takes_data != spec.takes_data:
        raise ValueError(f"task {name}: its class says takes_data = {spec.task.takes_data}, its entry's data is "
                         f"{spec.data!r}; give data (what a --data file holds) exactly when the task reads one")


def check_registry() -> None:
    for name, spec in REGISTRY.items():
        _check(name, spec)


def register(name: str, spec: TaskSpec, replace: bool = False) -> TaskSpec:
    """Add a task at run time (``replace``: over an entry of the same name), checked as the built-ins are."""
    if name in REGISTRY and not replace:
        raise ValueError(f"evaluation task {name!r} is already registered; pass replace=True")
    _check(name, spec)
    REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a task (one registered at run time, e.g. by a test)."""
    REGISTRY.pop(name, None)


def names(**fields) -> tuple[str, ...]:
    """Registered names in table order; ``fields``: only those whose attributes equal these (``kind="ppl"``)."""
    return tuple(n for n, s in REGISTRY.items() if all(getattr(s, f) == v for f, v in fields.items()))


def Names(**fields) -> LiveNames:  # noqa: N802 - used like the class it was
    """The registered names (those matching ``fields``), read at each use (``core.live_names.LiveNames``)."""
    return LiveNames(lambda: names(**fields))


check_registry()

__all__ = ["KINDS", "Names", "REGISTRY", "TaskSpec", "names", "register", "unregister"]
