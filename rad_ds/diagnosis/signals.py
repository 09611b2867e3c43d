"""Acceptance signals: how well a skip-draft agrees with the full model at one scored position, and the
per-sequence totals (accepted, drafted, rounds) that the cost model turns into a throughput estimate.

* ``expected`` (default): the probability that speculative sampling at temperature T accepts the draft's token,
  ``alpha = sum_v min(p(v), q(v)) = 1 - TV(p, q)`` (p: full model, q: skip-draft, both softmax(logits / T);
  Leviathan et al. 2023, Chen et al. 2023). With the per-position alphas along a sequence, a round started at
  position t accepts ``E[L_t] = sum_{j=1..g} prod_{i<j} alpha_{t+i}`` drafted tokens on average (draft length
  g); the sequence's expected accepted length is the mean over its start positions. It weighs the whole
  next-token distribution, so every position carries information (a continuous score, not a 0/1 event).
* ``greedy``: argmax agreement (1/0) and the rounds of greedy verification replayed over it: exact for the
  full model's greedy continuations (``acceptance.py``), the former default.

A signal is one entry of ``SIGNALS``: a name, a sentence for ``--help`` and the report, ``prepare`` (the full
model's side of a sequence, once), ``score`` (per position, per mask) and ``totals`` (per sequence). Adding one is
a class and a registry line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def acceptance_probability(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``sum_v min(p(v), q(v))`` per row, with ``p, q = softmax(logits / temperature)`` (computed in float32 or
    wider): the chance that speculative sampling accepts a token the draft ``q`` proposed where the verifier
    is ``p``."""
    sig = ExpectedSignal(temperature)
    return sig.score(sig.prepare(p_logits), q_logits)


def expected_accepted_lengths(alpha: torch.Tensor, draft_len: int) -> torch.Tensor:
    """``E[L_t] = sum_{j=1..g} prod_{i<j} alpha[t+i]`` for every start t with g positions ahead (all starts of a
    sequence shorter than g use what is left of it). ``alpha``: (n,) per-position acceptance probabilities."""
    a = alpha.double().view(-1)
    n = a.numel()
    if n == 0:
        return a
    g = min(draft_len, n)
    windows = a.unfold(0, g, 1)  # (n - g + 1, g)
    return windows.cumprod(-1).sum(-1)


@dataclass(frozen=True)
class Totals:
    """Per-sequence totals (floats; integral for greedy): what ``AcceptanceStats`` sums."""

    accepted: float
    drafted: float
    rounds: float
    tokens: float
    alpha: float  # sum of the per-position scores
    positions: float


class ExpectedSignal:
    name = "expected"
    help = ("expected acceptance of speculative sampling at the temperature: alpha = sum_v min(p, q) per "
            "position, expected accepted length from the alphas")

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _probs(self, logits: torch.Tensor, dtype=None) -> torch.Tensor:
        dt = dtype or torch.promote_types(logits.dtype, torch.float32)
        return torch.softmax(logits.to(dt) / max(float(self.temperature), 1e-6), -1)

    def prepare(self, full_logits: torch.Tensor, targets=None) -> torch.Tensor:
        """The full model's side, computed once per sequence: its probabilities at the temperature."""
        return self._probs(full_logits)

    def score(self, reference: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
        """alpha per position from the full model's probabilities and the draft's logits."""
        q = self._probs(draft_logits, reference.dtype)
        return torch.minimum(reference, q).sum(-1).clamp_(0.0, 1.0).double()

    def totals(self, values: torch.Tensor, draft_len: int, max_new_tokens: int | None = None,
               eos_at_end: bool = False) -> Totals:
        n = values.numel()
        if n == 0:
            return Totals(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        mean_len = float(expected_accepted_lengths(values, draft_len).mean())
        g = min(draft_len, n)
        rounds = n / (1.0 + mean_len)  # each round yields its accepted tokens and one from the verifier
        return Totals(rounds * mean_len, rounds * g, rounds, float(n), float(values.double().sum()), float(n))


class GreedySignal:
    name = "greedy"
    help = ("greedy verification: argmax agreement (0/1) per position and the decoder's rounds replayed over "
            "it (exact on the full model's greedy continuations)")

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature  # unused: greedy verification ignores it

    def prepare(self, full_logits: torch.Tensor, targets=None) -> torch.Tensor:
        """The tokens the draft must propose: the continuation's own (exactness), else the full model's argmax."""
        return (targets if targets is not None else full_logits.argmax(-1)).to(full_logits.device)

    def score(self, reference: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
        return (draft_logits.argmax(-1) == reference).double()

    def totals(self, values: torch.Tensor, draft_len: int, max_new_tokens: int | None = None,
               eos_at_end: bool = False) -> Totals:
        from .acceptance import replay_rounds  # deferred: import cycle (acceptance imports signals)

        agree = [bool(v) for v in values.tolist()]
        n = len(agree)
        acc, dr = replay_rounds(agree, eos_at_end, n, draft_len, max_new_tokens if max_new_tokens else n + 1)
        return Totals(float(sum(acc)), float(sum(dr)), float(len(acc)), float(n), float(sum(agree)), float(n))


SIGNALS = {s.name: s for s in (ExpectedSignal, GreedySignal)}


def make_signal(name: str, temperature: float = 1.0):
    if name not in SIGNALS:
        raise ValueError(f"signal {name!r}: use one of {', '.join(SIGNALS)}")
    return SIGNALS[name](temperature)


__all__ = ["SIGNALS", "ExpectedSignal", "GreedySignal", "Totals", "acceptance_probability",
           "expected_accepted_lengths", "make_signal"]
