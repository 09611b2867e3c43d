"""``Choice``: the attention layers a placement strategy picked for one k, with what choosing them cost.

Every strategy returns one, so a comparison of strategies reads the same fields: the layers (sorted, distinct),
the per-layer scores the ranking used (where there is a ranking), the seconds and the forward passes spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SelectionError(ValueError):
    """A placement that cannot be chosen as asked; the message names the setting or file and the fix."""


@dataclass(frozen=True)
class Choice:
    layers: tuple[int, ...]  # sorted, distinct attention-layer indices
    method: str
    k: int
    seconds: float  # wall-clock of choosing (the scoring itself; for report methods, the diagnosis' own time)
    forward_passes: int  # model forwards over one calibration sequence each (0 for training-free spacings)
    scores: dict[int, float] | None = None  # per attention layer, the value ranked (see ``score``)
    score: str = ""  # what ``scores`` holds and which end is chosen
    details: dict = field(default_factory=dict)  # method-specific provenance (seed, report path, sizes)

    def record(self) -> dict:
        """What a student / checkpoint stores about where its layers came from (JSON-safe: string keys)."""
        out = {"placement": self.method, "k": self.k, "layers": list(self.layers), "seconds": self.seconds,
               "forward_passes": self.forward_passes, **self.details}
        if self.scores is not None:
            out["scores"] = {str(i): float(v) for i, v in sorted(self.scores.items())}
            out["score"] = self.score
        return out


@dataclass(frozen=True)
class Inputs:
    """What a placement strategy may read. ``choose_layers`` fills in what the strategy's registry entry says it
    needs (and refuses a call that lacks it) before calling the strategy."""

    config: Any  # the model's config: its ``layer_types`` (every strategy has it)
    model: Any = None  # the loaded ``RadHybridForCausalLM`` (strategies that read weights)
    report: Any = None  # a diagnosis report.json path or ``DiagnosisReport`` (strategies that read one)
    calibration: list | None = None  # token-id sequences (strategies that score layers on data)
    seed: int = 0  # a draw's or an initialisation's seed (strategies that use one)


def lowest(scores: dict[int, float], k: int) -> tuple[int, ...]:
    """The k layers with the smallest score (ties: lower index first), sorted."""
    return tuple(sorted(sorted(scores, key=lambda i: (scores[i], i))[:k]))


def highest(scores: dict[int, float], k: int) -> tuple[int, ...]:
    """The k layers with the largest score (ties: lower index first, as ``decoding.skipping.topk_mask``), sorted."""
    return tuple(sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k]))


__all__ = ["Choice", "Inputs", "SelectionError", "highest", "lowest"]
