"""A teacher's sparse targets: the k most likely tokens per position with their log-probabilities and the log of
the mass outside them (the teacher cache stores them; the sparse KD loss reads them). ``fused_teacher_topk``
takes them straight from the final hidden states and the LM head, chunk by chunk, never holding all the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rad_ds.core.dtypes import compute_dtype


def tail_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the mass of ``logp`` outside ``idx`` (exact: a logsumexp over the other tokens)."""
    if idx.size(-1) >= logp.size(-1):
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """``(indices, log-probabilities, tail log-mass)`` of the ``k`` most likely tokens of softmax(logits / T):
    shapes ``(..., k)``, ``(..., k)``, ``(...)``; the tail is -inf when ``k`` covers the vocabulary."""
    logp = F.log_softmax(teacher_logits.to(compute_dtype(teacher_logits)) / temperature, dim=-1)
    top, idx = logp.topk(min(k, logp.size(-1)), dim=-1)
    return idx, top, tail_logmass(logp, idx)


@torch.no_grad()
def fused_teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float = 1.0,
                       chunk_tokens: int = 1024):
    """:func:`teacher_topk` of ``hidden @ weight^T`` (rows ``(N, H)``), projected and reduced chunk by chunk:
    ``(N, k)`` indices and log-probabilities and ``(N,)`` tail log-mass, with only ``chunk_tokens x V`` logits
    alive at a time."""
    parts = [teacher_topk(F.linear(h, weight), k, temperature) for h in hidden.split(max(int(chunk_tokens), 1))]
    if not parts:
        return teacher_topk(F.linear(hidden, weight), k, temperature)
    return tuple(torch.cat(xs) for xs in zip(*parts))


__all__ = ["fused_teacher_topk", "tail_logmass", "teacher_topk"]
