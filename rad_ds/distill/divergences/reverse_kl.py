"""Reverse KL, KL(student || teacher) = sum p (s - t): mode-seeking (MiniLLM, Gu et al. 2024).

dL/dz = p ((s - t) - L): the row constant is the divergence itself."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Divergence, w_diff


class ReverseKL(Divergence):
    name = "reverse_kl"

    def reference(self, s, t):
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)

    def rows(self, s, t):
        s_minus_t = t.neg_().add_(s)
        d = s_minus_t.mul_(s.exp_()).sum(-1, keepdim=True)  # sum p (s - t): also the gradient's constant
        return d, d

    def grad_rows(self, s, t, c):
        s_minus_t_minus_l = t.neg_().add_(s).sub_(c)
        return s_minus_t_minus_l.mul_(s.exp_())  # p ((s - t) - L)

    def bucket(self, s, t):
        return w_diff(s.exp(), s, t)

    def elementwise(self, s, t):
        return s.exp() * (s - t)


__all__ = ["ReverseKL"]
