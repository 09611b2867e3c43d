"""Distillation losses: logit KD (forward KL, reverse KL, JSD), replaced-layer output losses (MSE,
cosine) and cross-entropy on the data.

Every function returns the **sum** of a per-token loss over the positions that ``mask`` selects; the
trainer divides by the number of selected tokens of the whole global batch (all micro-batches of all
ranks), so a step's loss and gradient do not depend on how the batch was split over ranks and
micro-batches. ``mean_*`` helpers give the per-token mean of one tensor. A mask that selects nothing
gives 0 with a gradient of 0, never NaN.

Logit losses run in float32 over chunks of ``chunk_tokens`` selected positions, so the extra memory is
``chunk_tokens x vocab`` floats rather than ``batch x seq x vocab``; results equal the unchunked sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between the two next-token distributions, ``(..., V) -> (...)``, in float32.

    ``forward_kl``: KL(teacher || student) (Hinton et al.; RAD's default); ``reverse_kl``: KL(student ||
    teacher); ``jsd``: beta*KL(T||M) + (1-beta)*KL(S||M) with M = beta*T + (1-beta)*S (TRL's generalised
    JSD; beta=0.5 is the symmetric JSD). Distributions are softmax(logits / T); the result is scaled by
    T^2 so gradient magnitudes do not shrink with the temperature (Hinton et al. 2015, sec. 2)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        d = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta={beta} must be in (0, 1)")
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        d = beta * F.kl_div(m, t, reduction="none", log_target=True).sum(-1) + (1.0 - beta) * F.kl_div(
            m, s, reduction="none", log_target=True
        ).sum(-1)
    else:
        raise ValueError(f"unknown KD loss {kind!r}; use one of {list(KD_KINDS)}")
    return d * (temperature**2)


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still connected to ``t``'s graph (backward works and gives zero gradients)."""
    return t.reshape(-1)[:1].float().sum() * 0.0


def _selected_rows(mask: torch.Tensor, chunk_tokens: int):
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    return idx.split(max(int(chunk_tokens), 1))


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Sum over selected positions of :func:`token_divergence`. ``logits (b, l, V)``, ``mask (b, l)``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "vocab sizes must match (or use loss.vocab=truncate)"
        )
    v = student_logits.size(-1)
    s_flat, t_flat = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    total = _zero_like_graph(student_logits)
    for rows in _selected_rows(mask, chunk_tokens):
        d = token_divergence(s_flat.index_select(0, rows), t_flat.index_select(0, rows).detach(), kind,
                             temperature, beta)
        total = total + d.sum()
    return total


def ce_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Cross-entropy of predicting ``input_ids[:, t+1]`` at position ``t``, summed over the positions
    that ``mask`` selects (``mask[:, -1]`` is ignored: the last position has no target)."""
    v = logits.size(-1)
    m = mask.clone()
    m[:, -1] = 0
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    flat, tgt = logits.reshape(-1, v), targets.reshape(-1)
    total = _zero_like_graph(logits)
    for rows in _selected_rows(m, chunk_tokens):
        total = total + F.cross_entropy(flat.index_select(0, rows).float(), tgt.index_select(0, rows), reduction="sum")
    return total


def hidden_loss_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                    kind: str = "mse") -> torch.Tensor:
    """Per-token distance between a student layer's output and the teacher's, summed over selected
    tokens. ``mse``: mean over the hidden dimension of the squared difference; ``cosine``: 1 - cos."""
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if kind == "mse":
        d = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        d = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown hidden-state loss {kind!r}; use mse or cosine")
    return torch.where(mask.bool(), d, torch.zeros_like(d)).sum()  # where, not *: 0 * NaN is NaN


def mean_kd_loss(student_logits, teacher_logits, mask=None, **kw) -> torch.Tensor:
    """Per-token mean of :func:`kd_loss_sum` over one batch (0 when nothing is selected)."""
    mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool) if mask is None else mask
    return kd_loss_sum(student_logits, teacher_logits, mask, **kw) / mask.sum().clamp(min=1)


__all__ = [
    "KD_KINDS", "ce_loss_sum", "hidden_loss_sum", "kd_loss_sum", "mean_kd_loss", "token_divergence",
]
