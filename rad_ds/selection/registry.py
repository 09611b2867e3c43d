"""The placement strategies, by name: the one table that every list, ``--help`` text, config check and dispatch
reads (``student.placement``, the study's ``methods``, ``choose_layers``).

An entry says what the strategy needs (a diagnosis report, the weights, calibration tokens, a seed) and holds its
function, ``choose(k, inputs) -> Choice``. Adding a strategy is a new file with that function plus one line in
``_BUILT_IN`` below (or ``register(Strategy(...))`` at run time, e.g. from a test or a plug-in): docs/extending.md.

| name | reads | chooses |
|---|---|---|
| ``rad`` | a diagnosis report | the report's selection for k (skip-set search with the top-k step) |
| ``single_skip`` | a diagnosis report | top-k of the per-layer single-skip acceptance rates |
| ``even`` | the layer layout | MambaInLlama's spacing, every (n/k)-th attention layer from layer 0 |
| ``random`` | the layer layout, a seed | k distinct layers drawn by ``numpy.random.default_rng(seed)`` |
| ``cosine`` | weights, calibration tokens | k lowest ``1 - cos(h, h + attn(h))`` (LLM-Drop) |
| ``kl_probe`` | weights, calibration tokens, a seed | k lowest KL(teacher || one layer replaced at init) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rad_ds.core.live_names import LiveNames

from .choice import Choice, Inputs, SelectionError
from .cosine import cosine_strategy
from .from_report import rad_strategy, single_skip_strategy
from .kl_probe import kl_probe_strategy
from .spacing import even_strategy, random_strategy

SEED_USES = ("", "draw", "init")


@dataclass(frozen=True)
class Strategy:
    """One placement strategy: its name, its function and what that function reads."""

    name: str
    choose: Callable[[int, Inputs], Choice]  # (k, inputs) -> the k attention layers it picks, with their cost
    summary: str  # one line: what it chooses (docs, --help)
    needs_report: bool = False  # reads a diagnosis report (student.report; the study makes or takes one)
    needs_weights: bool = False  # reads the model's weights (the model is loaded for it)
    needs_calibration: bool = False  # scores layers on calibration tokens (training documents)
    seed: str = ""  # what a seed decides: "" nothing; "draw" the layers (the study makes one placement per
    #                 random_seeds draw); "init" an initialisation its scoring uses (student.placement_seed)


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy, replace: bool = False) -> Strategy:
    """Add ``strategy`` to the table (``replace``: over an entry of the same name); returns it."""
    if strategy.seed not in SEED_USES:
        raise ValueError(f"strategy {strategy.name!r}: seed = {strategy.seed!r}; use one of {SEED_USES}")
    if strategy.name in STRATEGIES and not replace:
        raise ValueError(f"placement strategy {strategy.name!r} is already registered; pass replace=True")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy (one registered at run time, e.g. by a test)."""
    STRATEGIES.pop(name, None)


def names(**needs) -> tuple[str, ...]:
    """Registered names in table order; ``needs``: only those whose fields equal these (``needs_report=True``)."""
    return tuple(n for n, s in STRATEGIES.items() if all(getattr(s, f) == v for f, v in needs.items()))


def get_strategy(name: str, what: str = "student.placement") -> Strategy:
    """The entry of ``name``; an unknown name is refused in one line that lists the table."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise SelectionError(f"{what}: {name!r} is not a placement method; use one of {', '.join(names())}") from None


def Names(**needs) -> LiveNames:  # noqa: N802 - used like the class it was
    """The registered names (those matching ``needs``), read at each use (``core.live_names.LiveNames``)."""
    return LiveNames(lambda: names(**needs))


_BUILT_IN = (
    Strategy("rad", rad_strategy, "the report's selection for k (skip-set search)", needs_report=True),
    Strategy("single_skip", single_skip_strategy, "top-k single-skip acceptance rates", needs_report=True),
    Strategy("even", even_strategy, "MambaInLlama's spacing (every n/k-th attention layer)"),
    Strategy("random", random_strategy, "k layers drawn with a seed", seed="draw"),
    Strategy("cosine", cosine_strategy, "k lowest 1 - cos(h, h + attn(h)) (LLM-Drop)", needs_weights=True,
             needs_calibration=True),
    Strategy("kl_probe", kl_probe_strategy, "k lowest KL of one layer replaced at init", needs_weights=True,
             needs_calibration=True, seed="init"),
)
for _s in _BUILT_IN:
    register(_s)

METHODS = Names()  # every strategy's name
NEEDS_REPORT = Names(needs_report=True)
NEEDS_WEIGHTS = Names(needs_weights=True)

__all__ = ["METHODS", "NEEDS_REPORT", "NEEDS_WEIGHTS", "Names", "STRATEGIES", "Strategy", "get_strategy", "names",
           "register", "unregister"]
