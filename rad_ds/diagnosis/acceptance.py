"""Fast, exact acceptance estimation for greedy self-speculative decoding.

Greedy verification outputs the full model's greedy continuation ``y``, whatever the draft. In a round
that starts at position ``s`` (the last accepted token), the draft proposes ``argmax draft(. | y[:s+1])``,
then continues from its own tokens; every proposal up to the first mismatch was made on a prefix of ``y``.
So one parallel draft forward over ``prompt + y`` gives, at each position, what the draft would propose
there, and the runs of agreement with ``y`` are exactly the accepted lengths the real decoder sees (with
the draft keeping its own caches, a fixed draft length and no draft exit). ``trace`` replays the rounds;
``tests/test_diagnosis.py`` checks it against ``SelfSpeculativeDecoder`` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rad_ds.decoding.eos import eos_set
from rad_ds.decoding.skipping import PrefixRunner
from rad_ds.decoding.spec_decode import plain_decode


@dataclass
class AcceptanceStats:
    """Integer totals (exact to reduce over ranks)."""

    accepted: int = 0  # accepted drafted tokens
    drafted: int = 0  # drafted tokens
    rounds: int = 0  # draft-verify rounds
    tokens: int = 0  # generated tokens

    def __add__(self, o: "AcceptanceStats") -> "AcceptanceStats":
        return AcceptanceStats(self.accepted + o.accepted, self.drafted + o.drafted, self.rounds + o.rounds,
                               self.tokens + o.tokens)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.accepted, self.drafted, self.rounds, self.tokens], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "AcceptanceStats":
        a, d, r, n = (int(x) for x in t.tolist())
        return cls(a, d, r, n)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0


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
    """Holds the full model's greedy continuations of a prompt set and scores skip masks on them."""

    def __init__(self, model, prompts: list[torch.Tensor], max_new_tokens: int, draft_len: int,
                 eos_token_id=None):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.draft_len = draft_len
        self.eos_token_id = eos_token_id
        eos = eos_set(eos_token_id)
        self.prompt_lens, self.continuations, self.eos_at_end = [], [], []
        seqs = []
        for p in prompts:
            p = torch.as_tensor(p).view(-1)
            y = plain_decode(model, p, max_new_tokens, eos_token_id=eos_token_id).tokens
            self.prompt_lens.append(p.numel())
            self.continuations.append(y)
            self.eos_at_end.append(bool(y) and y[-1] in eos)
            # the last generated token is never fed to the draft: its successor is not needed
            seqs.append(torch.cat([p, torch.tensor(y[:-1], dtype=p.dtype)]))
        self.runner = PrefixRunner(model, seqs)

    def agreement(self, s: int, mask) -> list[bool]:
        """Per generated position j: does the draft's proposal equal the full model's token y[j]?"""
        y = self.continuations[s]
        if not y:
            return []
        start = self.prompt_lens[s] - 1
        pred = self.runner.logits(s, frozenset(mask), start)[: len(y)].argmax(-1).tolist()
        return [a == b for a, b in zip(pred, y)]

    def rounds(self, s: int, mask, draft_len: int | None = None) -> tuple[list[int], list[int]]:
        """(accepted, drafted) per round for prompt ``s``, as the real decoder would record them."""
        return replay_rounds(self.agreement(s, mask), self.eos_at_end[s], len(self.continuations[s]),
                             draft_len or self.draft_len, self.max_new_tokens)

    def trace(self, mask, draft_len: int | None = None, n_prompts: int | None = None) -> list[list[int]]:
        """Accepted lengths per round, per prompt (the first ``n_prompts``, or all)."""
        n = len(self.continuations) if n_prompts is None else min(n_prompts, len(self.continuations))
        return [self.rounds(s, mask, draft_len)[0] for s in range(n)]

    def prompt_stats(self, s: int, mask, draft_len: int | None = None) -> AcceptanceStats:
        """The totals of prompt ``s`` alone (the unit that bootstrap intervals resample)."""
        acc, dr = self.rounds(s, mask, draft_len)
        return AcceptanceStats(sum(acc), sum(dr), len(acc), len(self.continuations[s]))

    def per_prompt(self, mask, draft_len: int | None = None) -> list[AcceptanceStats]:
        return [self.prompt_stats(s, mask, draft_len) for s in range(len(self.continuations))]

    def stats(self, mask, draft_len: int | None = None) -> AcceptanceStats:
        total = AcceptanceStats()
        for st in self.per_prompt(mask, draft_len):
            total = total + st
        return total
