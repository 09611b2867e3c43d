"""Self-speculative decoding: the draft is the model with some attention sublayers skipped, the full
model verifies (Zhang et al. 2024, Draft & Verify; RAD, Hoshino et al. 2025).

Caches stay consistent with what was accepted. Each side keeps a count of the tokens its cache has
consumed and feeds the rest at its next call. After a round, attention KV is cropped to the accepted
tokens; a Mamba2 state cannot be cropped, so it is restored from a snapshot taken before the round and
the accepted tokens are fed again with the next call.

* ``share_kv=False`` (default): the draft keeps its own caches, so it is exactly the model with those
  sublayers removed (what ``acceptance.py`` estimates, exactly).
* ``share_kv=True``: the draft starts each round from the verifier's cache of the verified tokens, as
  Draft & Verify does.

Greedy verification reproduces plain greedy decoding of the full model token for token. Sampling
verification is standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept a drafted
token with probability ``min(1, p/q)``, else sample from ``norm(max(0, p - q))``; the output
distribution is the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rad_ds.models import RadHybridCache

from .eos import eos_set


@dataclass
class SpecConfig:
    draft_len: int = 4  # tokens drafted per round (the maximum, with adaptive exit)
    max_new_tokens: int = 64
    sampling: bool = False
    temperature: float = 1.0
    share_kv: bool = False
    # Draft & Verify's adaptive draft exit: stop drafting when the draft's top-1 probability falls below
    # a threshold that follows the recent acceptance rate (raised when it is below `exit_target`).
    adaptive_exit: bool = False
    exit_threshold: float = 0.6
    exit_target: float = 0.8
    exit_step: float = 0.01
    exit_beta: float = 0.5
    eos_token_id: int | list[int] | None = None

    def eos_set(self) -> set[int]:
        return eos_set(self.eos_token_id)


@dataclass
class SpecResult:
    tokens: list[int]
    accepted: list[int] = field(default_factory=list)  # accepted drafted tokens, per round
    drafted: list[int] = field(default_factory=list)  # drafted tokens, per round
    seconds: float = 0.0
    prefill_seconds: float | None = None  # plain_decode: from the start to the first new token (the prompt's pass)

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Side:
    """One model view (full or draft) with its cache and the number of sequence tokens it consumed."""

    def __init__(self, model, skip):
        self.model, self.skip = model, skip or None
        self.cache = RadHybridCache(model.config)
        self.fed = 0

    def feed(self, tokens: list[int], n_logits: int = 1) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.model.device)
        out = self.model(ids, cache=self.cache, use_cache=True, skip_layers=self.skip, logits_to_keep=n_logits)
        return out.logits[0].float()

    def rollback(self, valid: int, consumed: int, snapshot: RadHybridCache | None, snap_len: int):
        """After consuming ``consumed`` tokens, keep only the first ``valid``."""
        if valid >= consumed:
            self.fed = consumed
        elif snapshot is None:  # attention-only: crop the KV
            self.cache.crop(valid)
            self.fed = valid
        else:  # Mamba2 state: back to the snapshot, the rest is fed again next time
            self.cache = snapshot
            self.fed = snap_len


class SelfSpeculativeDecoder:
    """Draft with ``skip_layers`` (attention sublayers skipped), verify with the full model."""

    def __init__(self, model, skip_layers, config: SpecConfig | None = None):
        self.model = model
        self.skip = frozenset(skip_layers)
        self.cfg = config or SpecConfig()
        self.has_mamba = any(t == "mamba2" for t in model.config.layer_types)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / max(self.cfg.temperature, 1e-6), dim=-1)

    @torch.no_grad()
    def generate(self, input_ids, generator: torch.Generator | None = None) -> SpecResult:
        cfg, eos = self.cfg, self.cfg.eos_set()
        seq = [int(t) for t in torch.as_tensor(input_ids).view(-1).tolist()]
        n_prompt = len(seq)
        full, draft = _Side(self.model, None), _Side(self.model, self.skip)
        res = SpecResult(tokens=[])
        threshold, ema = cfg.exit_threshold, None
        dev = self.model.device
        _sync(dev)
        t0 = time.perf_counter()
        while len(seq) - n_prompt < cfg.max_new_tokens:
            remaining = cfg.max_new_tokens - (len(seq) - n_prompt)
            gamma = min(cfg.draft_len, remaining - 1)
            base = len(seq)  # seq ends with the pending token, whose successor is unknown
            drafts, qs, d_snap = self._draft(draft, full, seq, base, gamma, threshold, generator)
            # verify (also feeds whatever the full cache has not consumed yet)
            f_snap = full.cache.snapshot() if self.has_mamba else None
            f_snap_len = full.fed
            vlogits = full.feed(seq[full.fed:] + drafts, n_logits=len(drafts) + 1)
            full.fed = base + len(drafts)
            if cfg.sampling:
                n, stop, new = self._accept_sampled(vlogits, drafts, qs, eos, generator)
            else:
                n, stop, new = _accept_greedy(vlogits, drafts, eos)
            res.accepted.append(n)
            res.drafted.append(len(drafts))
            if cfg.adaptive_exit and drafts:
                threshold, ema = self._adapt(threshold, ema, n / len(drafts))
            # keep the caches to what was accepted: seq[:base] + drafts[:n]
            valid = base + n
            full.rollback(valid, base + len(drafts), f_snap, f_snap_len)
            if drafts and not cfg.share_kv:
                draft.rollback(valid, draft.fed, d_snap, base)
            for t in new:
                seq.append(t)
                if t in eos:
                    stop = True
                    break
            if stop or seq[-1] in eos:
                break
        _sync(dev)
        res.seconds = time.perf_counter() - t0
        res.tokens = seq[n_prompt:]
        return res

    def _draft(self, draft: _Side, full: _Side, seq: list[int], base: int, gamma: int, threshold: float,
               generator) -> tuple[list[int], list[torch.Tensor], RadHybridCache | None]:
        """Up to ``gamma`` draft tokens (and their distributions), and the draft cache's snapshot."""
        cfg = self.cfg
        drafts, qs, d_snap = [], [], None
        if gamma <= 0:
            return drafts, qs, d_snap
        if cfg.share_kv:
            draft.cache, draft.fed = full.cache.snapshot(), full.fed
        logits = draft.feed(seq[draft.fed:])[-1]
        draft.fed = base
        d_snap = draft.cache.snapshot() if self.has_mamba and not cfg.share_kv else None
        for j in range(gamma):
            if j > 0:
                logits = draft.feed([drafts[-1]])[-1]
                draft.fed += 1
            q = self._probs(logits)
            if cfg.adaptive_exit and j > 0 and float(q.max()) < threshold:
                break  # the first token is always drafted, so the threshold keeps adapting
            d = int(torch.multinomial(q, 1, generator=generator)) if cfg.sampling else int(logits.argmax())
            drafts.append(d)
            qs.append(q)
        return drafts, qs, d_snap

    def _accept_sampled(self, vlogits, drafts, qs, eos, generator) -> tuple[int, bool, list[int]]:
        """Speculative sampling (Leviathan et al.): accept d with min(1, p/q), else sample the residual."""
        n, stop, new = 0, False, []
        ps = self._probs(vlogits)
        for j, d in enumerate(drafts):
            p, q = ps[j], qs[j]
            r = torch.rand((), generator=generator, device=p.device)
            if float(r) < min(1.0, float(p[d] / q[d])):
                n += 1
                new.append(d)
                if d in eos:
                    return n, True, new
            else:
                resid = torch.clamp(p - q, min=0)
                resid = resid / resid.sum() if float(resid.sum()) > 0 else p
                new.append(int(torch.multinomial(resid, 1, generator=generator)))
                return n, stop, new
        new.append(int(torch.multinomial(ps[len(drafts)], 1, generator=generator)))
        return n, stop, new

    def _adapt(self, threshold: float, ema: float | None, rate: float) -> tuple[float, float]:
        """Draft & Verify's adaptive exit: move the confidence threshold towards the target acceptance."""
        cfg = self.cfg
        ema = rate if ema is None else cfg.exit_beta * ema + (1 - cfg.exit_beta) * rate
        threshold += cfg.exit_step if ema < cfg.exit_target else -cfg.exit_step
        return min(max(threshold, 0.0), 1.0), ema


def _accept_greedy(vlogits, drafts, eos) -> tuple[int, bool, list[int]]:
    """Greedy verification: the longest prefix of drafts equal to the full model's argmax, then its token."""
    preds = vlogits.argmax(-1).tolist()
    n, new = 0, []
    for j, d in enumerate(drafts):
        if d != preds[j]:
            break
        n += 1
        new.append(d)
        if d in eos:
            return n, True, new
    new.append(preds[n])
    return n, False, new


@torch.no_grad()
def plain_decode(model, input_ids, max_new_tokens: int, eos_token_id=None, skip_layers=None,
                 sampling: bool = False, temperature: float = 1.0, generator=None) -> SpecResult:
    """Token-by-token decoding with the cache (the baseline for speed-ups, and greedy's definition)."""
    eos = eos_set(eos_token_id)
    side = _Side(model, skip_layers)
    seq = [int(t) for t in torch.as_tensor(input_ids).view(-1).tolist()]
    n_prompt = len(seq)
    dev = model.device
    _sync(dev)
    t0 = time.perf_counter()
    first = None
    while len(seq) - n_prompt < max_new_tokens:
        logits = side.feed(seq[side.fed:])[-1]
        side.fed = len(seq)
        if sampling:
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            t = int(logits.argmax())
        if first is None:  # int() waited for the device: the prompt's forward is done
            first = time.perf_counter()
        seq.append(t)
        if t in eos:
            break
    _sync(dev)
    end = time.perf_counter()
    return SpecResult(tokens=seq[n_prompt:], seconds=end - t0, prefill_seconds=(end if first is None else first) - t0)
