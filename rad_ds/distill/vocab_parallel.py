"""The fused LM head + KD/CE loss on a vocabulary shard (``student.vocab_parallel``): no rank holds the whole
head, no rank makes whole logits.

Each rank holds head rows ``[lo, hi)`` (:mod:`rad_ds.models.vocab_parallel`) and its own tokens. The selected
rows' final hidden states (both streams) and CE targets are all-gathered, so every rank walks the same
``(all ranks' rows) x (its vocabulary slice)`` chunks; per chunk:

* the log-sum-exp over the whole vocabulary is a cross-rank one: an all-reduce MAX of the row maxima, then an
  all-reduce SUM of ``sum exp(z - max)``, so ``s``, ``t`` are the slice of the *globally* normalised
  log-probabilities;
* the divergence's ``rows(s, t) -> (d, c)`` (``rad_ds.distill.divergences``: per-row sums of elementwise
  terms) runs on the slice and ``d``, ``c`` are all-reduced (SUM), together with CE's target logit, which only
  the rank owning the target's row picks; ``grad_rows(s, t, c)`` then gives the slice of ``dL/dz``;
* ``dL/dz @ W_slice`` is this rank's part of the gradient of every gathered row's hidden state.

One all-reduce SUM of those parts per loss term completes the hidden-state gradients; each rank keeps its own
rows'. As in :mod:`rad_ds.distill.fused`, gradients are computed in the forward and the backward only scales
them by the incoming gradient, so backward makes no collective call. The head is frozen (no gradient).
Equal to :func:`rad_ds.distill.fused.fused_loss_sums` on the whole head (tests/test_vocab_parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rad_ds.core.dtypes import compute_dtype
from rad_ds.models.vocab_parallel import VocabShard, gather_rows, own_slice

from .config import ConfigError
from .divergences import resolve
from .losses import ce_targets


def _all_reduce(x: torch.Tensor, world: int, op=None) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM)
    return x


def global_lse(cols: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """The whole-vocabulary log-sum-exp ``(c, 1)`` of each ``(c, V_slice)`` tensor of ``cols`` (two collectives
    for all of them: a MAX of the row maxima, a SUM of ``sum exp(x - max)``)."""
    neg_inf = torch.full((cols[0].size(0), 1), float("-inf"), dtype=cols[0].dtype, device=cols[0].device)
    m = torch.cat([x.amax(-1, keepdim=True) if x.size(-1) else neg_inf for x in cols], dim=-1)
    _all_reduce(m, world, torch.distributed.ReduceOp.MAX if world > 1 else None)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf logits everywhere: no shift
    e = torch.cat([(x - m[:, i:i + 1]).exp_().sum(-1, keepdim=True) for i, x in enumerate(cols)], dim=-1)
    _all_reduce(e, world)
    lse = m + e.log()
    return [lse[:, i:i + 1] for i in range(len(cols))]


class _Scratch:
    """Per-call state of the shard loss: the gathered rows' gradients and per-row results."""

    def __init__(self, rows: int, hidden: torch.Tensor, terms: list[str], want: bool, dtype):
        self.gh = {t: torch.zeros_like(hidden) if want else None for t in terms}
        self.rows = {t: torch.zeros(rows, 1, dtype=dtype, device=hidden.device) for t in terms}


def _chunk(sc: _Scratch, r: slice, hs, ht, y, ws, wt, sh: VocabShard, div, temperature, want, dtype):
    """One chunk of gathered rows: its per-row KD / CE values and its part of the hidden-state gradients."""
    zs = F.linear(hs, ws).to(dtype)  # (c, V_slice), as lm_head computes it, then float32
    zt = F.linear(ht, wt).to(dtype) if div is not None else None
    cols = ([zs / temperature, zt / temperature] if div is not None else []) + ([zs] if y is not None else [])
    lses = global_lse(cols, sh.world)
    sums = []
    if div is not None:
        d, c = div.rows(cols[0] - lses[0], cols[1] - lses[1])
        sums += [d, c]
    if y is not None:
        local = y - sh.lo
        mine = ((y != -100) & (local >= 0) & (local < sh.rows)).nonzero().squeeze(-1)  # targets in this slice
        picked = torch.zeros(zs.size(0), 1, dtype=dtype, device=zs.device)
        picked[mine, 0] = zs[mine, local[mine]]
        sums.append(picked)
    red = _all_reduce(torch.cat(sums, dim=-1), sh.world)  # d, c and the target logit, summed over the slices
    if div is not None:
        sc.rows["kd"][r] = red[:, :1]
        if want:
            g = div.grad_rows(cols[0] - lses[0], cols[1] - lses[1], red[:, 1:2]).mul_(temperature)
            sc.gh["kd"][r] += g.to(hs.dtype) @ ws  # T^2 * dL/dz / T
    if y is not None:
        keep = (y != -100).unsqueeze(-1)
        lse = lses[-1]
        sc.rows["ce"][r] = torch.where(keep, lse - red[:, -1:], torch.zeros_like(lse))
        if want:
            g = zs.sub_(lse).exp_()  # softmax - one_hot (the one on the rank owning the target), 0 if ignored
            g[mine, local[mine]] -= 1.0
            sc.gh["ce"][r] += g.mul_(keep.to(dtype)).to(hs.dtype) @ ws


class _ShardHeadLoss(torch.autograd.Function):
    """(KD sum, CE sum) of this rank's rows ``h_own`` given every rank's rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_own, s_all, t_all, y_all, ws, wt, counts, sh, div, temperature, chunk):
        dtype = compute_dtype(s_all)
        want = ctx.needs_input_grad[0]
        terms = [t for t, on in (("kd", div is not None), ("ce", y_all is not None)) if on]
        sc = _Scratch(s_all.size(0), s_all, terms, want, dtype)
        with torch.autocast(s_all.device.type, enabled=False), torch.no_grad():
            for start in range(0, s_all.size(0), chunk):
                r = slice(start, start + chunk)
                _chunk(sc, r, s_all[r], t_all[r] if t_all is not None else None,
                       y_all[r] if y_all is not None else None, ws, wt, sh, div, temperature, want, dtype)
            mine = own_slice(counts, sh.rank)
            grads = [_all_reduce(sc.gh[t], sh.world)[mine].clone() for t in terms] if want else []
        zero = torch.zeros((), dtype=dtype, device=s_all.device)
        sums = {t: sc.rows[t][mine].sum() for t in terms}
        ctx.terms, ctx.want = terms, want
        ctx.save_for_backward(*grads)
        return sums.get("kd", zero) * (temperature**2), sums.get("ce", zero)

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, g_kd, g_ce):
        out = None
        if ctx.want:
            scale = {"kd": g_kd, "ce": g_ce}
            for t, g in zip(ctx.terms, ctx.saved_tensors):
                if scale[t] is not None:
                    term = g * scale[t].to(g.dtype)
                    out = term if out is None else out.add_(term)
        return (out,) + (None,) * 10


def vocab_parallel_loss_sums(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor | None,
                             t_weight: torch.Tensor | None, mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                             kind: str | None = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                             chunk_tokens: int = 1024, *, shard: VocabShard) -> dict:
    """:func:`rad_ds.distill.fused.fused_loss_sums` with ``s_weight`` / ``t_weight`` the rows ``shard.lo:hi``
    of the two (frozen) heads: ``{"kd", "ce"}`` sums over this rank's selected positions, gradients to
    ``s_hidden``. Collective: every rank calls it with its own tokens, in the same order."""
    div = resolve(kind, beta) if kind is not None else None
    if div is None and input_ids is None:
        return {}
    if div is not None and (t_hidden is None or t_weight is None):
        raise ValueError("vocab-parallel loss: KD needs the teacher's hidden states and head rows")
    if s_weight.size(0) != shard.rows or (t_weight is not None and t_weight.size(0) != shard.rows):
        raise ValueError(f"vocab-parallel loss: head rows {tuple(s_weight.shape)} do not match the shard "
                         f"{shard.lo}:{shard.hi} of {shard.vocab}")
    if s_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"vocab-parallel loss: mask {tuple(mask.shape)} does not match hidden states "
                         f"{tuple(s_hidden.shape)}")
    rows = mask.reshape(-1).nonzero().squeeze(-1).to(s_hidden.device)
    h_own = s_hidden.reshape(-1, s_hidden.size(-1)).index_select(0, rows)
    s_all, counts = gather_rows(h_own.detach(), shard.world)
    t_all = y_all = None
    if div is not None:
        t_own = t_hidden.detach().reshape(-1, t_hidden.size(-1)).index_select(0, rows)
        t_all, _ = gather_rows(t_own, shard.world, counts)
    if input_ids is not None:
        tgt = ce_targets(input_ids, mask).to(s_hidden.device)
        y_all, _ = gather_rows(tgt.index_select(0, rows), shard.world, counts)
    kd, ce = _ShardHeadLoss.apply(h_own, s_all, t_all, y_all, s_weight.detach(),
                                  t_weight.detach() if t_weight is not None else None, counts, shard, div,
                                  float(temperature), max(int(chunk_tokens), 1))
    out = {}
    if div is not None:
        out["kd"] = kd
    if input_ids is not None:
        out["ce"] = ce
    return out


def resolve_vocab_parallel(mode: str, *, world: int, partitioned: bool, shared: bool, frozen: bool,
                           fused: str, cache: bool, vocab_limit) -> tuple[bool, str | None]:
    """``student.vocab_parallel`` for a run: (on, why not). ``true`` where it cannot work is a ConfigError."""
    why = None
    if world < 2:
        why = "one rank has nothing to split"
    elif not partitioned:
        why = "the student is not created ZeRO-3-partitioned from a safetensors base (a ZeRO-3 config and a " \
              "safetensors model.path are needed: the rows are read from its files)"
    elif not shared:
        why = "only the one-copy teacher (teacher.location=shared) shares the student's head"
    elif not frozen:
        why = "the embedding or LM head trains (student.trainable=all)"
    elif fused == "false" or cache:
        why = "the loss takes the logits path (loss.fused=false or teacher.cache)"
    elif vocab_limit is not None:
        why = "loss.vocab=truncate compares a prefix of the vocabulary"
    if why is not None and mode == "true":
        raise ConfigError(f"student.vocab_parallel=true: {why}; set student.vocab_parallel=auto or false")
    return mode != "false" and why is None, why


__all__ = ["global_lse", "resolve_vocab_parallel", "vocab_parallel_loss_sums"]
