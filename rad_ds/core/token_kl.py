"""KL(teacher || student) per token from log-probabilities, the measure the diagnosis, the KL-probe placement and
the study's held-out score share (the distillation losses, with temperatures, chunking and their gradients, are
``rad_ds.distill.losses``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the vocabulary (last dim), computed in float32 at least."""
    return F.log_softmax(logits.float(), dim=-1)


def token_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``sum_v p_t(v) (log p_t(v) - log p_s(v))`` for each row of the last dim; ``reduction``: ``"none"`` (one
    value per token), ``"sum"`` (over every token: divide by their number for the mean)."""
    terms = teacher_logp.exp() * (teacher_logp - student_logp)
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms.sum(-1)
    raise ValueError(f"token_kl: reduction = {reduction!r}; use 'sum' or 'none'")


__all__ = ["log_probs", "token_kl"]
