"""Where the student's Mamba2 layers go: named placement strategies (``rad``, ``single_skip``, ``even``,
``random``, ``cosine``, ``kl_probe``; the table is ``registry.STRATEGIES``), each returning a ``Choice`` with its
cost of choosing (docs/selection.md).

Not to be confused with ``rad_ds.distill.teacher_location``, which decides where the *teacher* lives."""

from .calibration import calibration_tokens
from .choice import Choice, Inputs, SelectionError
from .cosine import attention_redundancy
from .kl_probe import replacement_kl
from .registry import METHODS, NEEDS_REPORT, NEEDS_WEIGHTS, STRATEGIES, Strategy, get_strategy, names, register
from .run import choose_for_run
from .spacing import attention_layers, even_layers, random_layers
from .strategies import choose_layers

__all__ = [
    "METHODS", "NEEDS_REPORT", "NEEDS_WEIGHTS", "STRATEGIES", "Choice", "Inputs", "SelectionError", "Strategy",
    "attention_layers", "attention_redundancy", "calibration_tokens", "choose_for_run", "choose_layers",
    "even_layers", "get_strategy", "names", "random_layers", "register", "replacement_kl",
]
