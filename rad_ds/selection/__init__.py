"""Where the student's Mamba2 layers go: named placement strategies (``rad``, ``single_skip``, ``even``,
``random``, ``cosine``, ``kl_probe``), each returning a ``Choice`` with its cost of choosing (docs/selection.md).

Not to be confused with ``rad_ds.distill.placement``, which decides where the *teacher* lives."""

from .calibration import calibration_tokens
from .choice import Choice, SelectionError
from .cosine import attention_redundancy
from .kl_probe import replacement_kl
from .run import choose_for_run
from .spacing import attention_layers, even_layers, random_layers
from .strategies import METHODS, NEEDS_REPORT, NEEDS_WEIGHTS, choose_layers

__all__ = [
    "METHODS", "NEEDS_REPORT", "NEEDS_WEIGHTS", "Choice", "SelectionError", "attention_layers",
    "attention_redundancy", "calibration_tokens", "choose_for_run", "choose_layers", "even_layers",
    "random_layers", "replacement_kl",
]
