"""Acceptance estimation for self-speculative decoding, one parallel draft forward per (sequence, mask).

Two kinds of scored sequences:

* **continuations** (a prompt + the full model's greedy continuation ``y``): greedy verification outputs ``y``
  whatever the draft. In a round that starts at position ``s`` the draft proposes ``argmax draft(. | y[:s+1])``,
  then continues from its own tokens; every proposal up to the first mismatch was made on a prefix of ``y``. So
  one parallel draft forward over ``prompt + y`` gives what the draft proposes at each position, and the runs of
  agreement with ``y`` are exactly the accepted lengths the real decoder sees (the draft keeping its own caches,
  a fixed draft length, no draft exit). ``trace`` replays the rounds; ``tests/test_diagnosis.py`` checks it
  against ``SelfSpeculativeDecoder`` token for token.
* **documents** (the user's data, teacher-forced): every counted position of a real document is a context the
  full model could be asked to continue; the draft and the full model are compared there in one forward each.
  Thousands of positions cost what a few dozen generated tokens cost.

What is compared at a position is the signal (``signals.py``): ``expected`` (the probability that speculative
sampling accepts the draft's token, ``sum_v min(p, q)``) or ``greedy`` (argmax agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rad_ds.decoding.eos import eos_set
from rad_ds.decoding.skipping import PrefixRunner
from rad_ds.decoding.spec_decode import plain_decode

from .signals import make_signal


@dataclass
class AcceptanceStats:
    """Totals over sequences (floats: expected counts for the ``expected`` signal, integral for ``greedy``).
    Reduced over ranks by filling each sequence's own row, so the sums do not depend on the world size."""

    accepted: float = 0  # accepted drafted tokens
    drafted: float = 0  # drafted tokens
    rounds: float = 0  # draft-verify rounds
    tokens: float = 0  # generated (or scored) tokens
    alpha: float = 0  # sum of the per-position scores (acceptance probability, or 0/1 agreement)
    positions: float = 0  # scored positions

    def __add__(self, o: "AcceptanceStats") -> "AcceptanceStats":
        return AcceptanceStats(*(getattr(self, f.name) + getattr(o, f.name) for f in fields(self)))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "AcceptanceStats":
        vals = [float(x) for x in t.tolist()]
        return cls(*[int(v) if v.is_integer() else v for v in vals])

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def mean_alpha(self) -> float:
        """Mean per-position score: the expected per-token acceptance (``expected``) or agreement (``greedy``)."""
        return self.alpha / self.positions if self.positions else 0.0


N_STATS = len(fields(AcceptanceStats))


@dataclass
class Scored:
    """One scored sequence: ``ids`` are fed; the predictions at ``index`` (positions) are compared. ``targets``:
    the tokens the full model produced there (continuations), else ``None`` (documents)."""

    ids: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor | None = None
    eos_at_end: bool = False

    @property
    def is_continuation(self) -> bool:
        return self.targets is not None


def replay_rounds(agree: list[bool], eos_at_end: bool, n_new: int, draft_len: int, max_new_tokens: int):
    """Replay the decoder's rounds over a greedy continuation of ``n_new`` tokens.

    ``agree[j]`` tells whether the draft's proposal after ``prompt + y[:j]`` equals ``y[j]``.
    Returns ``(accepted, drafted)`` per round, as ``SelfSpeculativeDecoder`` records them."""
    accepted, drafted = [], []
    gen = 0
    while gen < n_new:
        gamma = min(draft_len, max_new_tokens - gen - 1)
        n, stop = 0, False
        for j in range(gamma):
            pos = gen + j
            if pos >= n_new or not agree[pos]:
                break
            n += 1
            if eos_at_end and pos == n_new - 1:
                stop = True  # an accepted EOS ends the round (and the generation)
                break
        accepted.append(n)
        drafted.append(max(gamma, 0))
        gen += n if stop else n + 1
    return accepted, drafted


class AcceptanceEstimator:
    """Holds the scored sequences (the full model's greedy continuations of ``prompts`` and/or teacher-forced
    ``documents``) and scores skip masks on them with a signal (``greedy``: the exact estimator on
    continuations; ``expected``: speculative sampling's acceptance probability)."""

    def __init__(self, model, prompts=(), max_new_tokens: int = 64, draft_len: int = 4, eos_token_id=None,
                 *, documents=(), signal: str = "greedy", temperature: float = 1.0):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.draft_len = draft_len
        self.eos_token_id = eos_token_id
        self.signal = make_signal(signal, temperature)
        eos = eos_set(eos_token_id)
        self.seqs: list[Scored] = []
        self.continuations = []  # the full model's greedy continuation of each prompt
        for p in prompts:
            p = torch.as_tensor(p).view(-1)
            y = plain_decode(model, p, max_new_tokens, eos_token_id=eos_token_id).tokens
            self.continuations.append(y)
            # the last generated token is never fed to the draft: its successor is not needed
            ids = torch.cat([p, torch.tensor(y[:-1], dtype=p.dtype)])
            index = torch.arange(p.numel() - 1, p.numel() - 1 + len(y))
            self.seqs.append(Scored(ids, index, torch.tensor(y, dtype=torch.long), bool(y) and y[-1] in eos))
        for d in documents:
            ids, target = (d if isinstance(d, (tuple, list)) else (d, None))
            ids = torch.as_tensor(ids, dtype=torch.long).view(-1)
            counted = (torch.ones(ids.numel(), dtype=torch.bool) if target is None
                       else torch.as_tensor(target).view(-1).bool())
            counted[-1] = False  # the last token's successor is not in the document
            self.seqs.append(Scored(ids, counted.nonzero().view(-1)))
        self.runner = PrefixRunner(model, [s.ids for s in self.seqs])
        # the full model's side of every comparison, once per sequence (probabilities, or argmaxes)
        self.reference = [self.signal.prepare(self.runner.full_logits(i, index=s.index), s.targets)
                          for i, s in enumerate(self.seqs)]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def positions(self) -> int:
        return int(sum(s.index.numel() for s in self.seqs))

    def values(self, s: int, mask) -> torch.Tensor:
        """Per scored position of sequence ``s``: the signal's score of the draft that skips ``mask``."""
        seq = self.seqs[s]
        if seq.index.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        logits = self.runner.logits(s, frozenset(mask), index=seq.index)
        return self.signal.score(self.reference[s], logits)

    def agreement(self, s: int, mask) -> list[bool]:
        """Per generated position j: does the draft's greedy proposal equal the full model's token y[j]?"""
        seq = self.seqs[s]
        if seq.index.numel() == 0:
            return []
        ref = seq.targets if seq.targets is not None else self.runner.full_logits(s, index=seq.index).argmax(-1)
        pred = self.runner.logits(s, frozenset(mask), index=seq.index).argmax(-1)
        return (pred == ref).tolist()

    def rounds(self, s: int, mask, draft_len: int | None = None) -> tuple[list[int], list[int]]:
        """(accepted, drafted) per round for continuation ``s`` under greedy verification, as the real decoder
        would record them."""
        return replay_rounds(self.agreement(s, mask), self.seqs[s].eos_at_end, len(self.seqs[s].index),
                             draft_len or self.draft_len, self.max_new_tokens)

    def trace(self, mask, draft_len: int | None = None, n_prompts: int | None = None) -> list[list[int]]:
        """Greedy accepted lengths per round, per continuation (the first ``n_prompts``, or all)."""
        n = len(self.continuations) if n_prompts is None else min(n_prompts, len(self.continuations))
        return [self.rounds(s, mask, draft_len)[0] for s in range(n)]

    def prompt_stats(self, s: int, mask, draft_len: int | None = None) -> AcceptanceStats:
        """The totals of sequence ``s`` alone (the unit that bootstrap intervals resample)."""
        seq = self.seqs[s]
        g = draft_len or self.draft_len
        cap = self.max_new_tokens if seq.is_continuation else None
        t = self.signal.totals(self.values(s, mask), g, cap, seq.eos_at_end)
        return AcceptanceStats(t.accepted, t.drafted, t.rounds, t.tokens, t.alpha, t.positions)

    def per_prompt(self, mask, draft_len: int | None = None) -> list[AcceptanceStats]:
        return [self.prompt_stats(s, mask, draft_len) for s in range(len(self.seqs))]

    def stats(self, mask, draft_len: int | None = None) -> AcceptanceStats:
        total = AcceptanceStats()
        for st in self.per_prompt(mask, draft_len):
            total = total + st
        return total
