"""Skew KL (DistiLLM, Ko et al. 2024): KL(T || alpha T + (1 - alpha) S), at most log(1/alpha) where plain
forward KL explodes on a teacher token the student gives no mass; alpha = 0.1 in the paper.

With lm = log(a q + (1-a) p) and r = p q / m: dL/dz = (1-a) (p sum r - r); the row constant is sum r."""

from __future__ import annotations

import torch.nn.functional as F

from .base import SkewDivergence, log_mix, w_diff


class SkewKL(SkewDivergence):
    name = "skew_kl"

    def _log_mix(self, s, t):
        return log_mix(t, s, self.alpha)  # log(a q + (1-a) p)

    def reference(self, s, t):
        return F.kl_div(self._log_mix(s, t), t, reduction="none", log_target=True).sum(-1)

    def rows(self, s, t):
        lm = self._log_mix(s, t)
        c = (s + t - lm).exp_().sum(-1, keepdim=True)  # sum p q / m
        return t.exp().mul_(t.sub_(lm)).sum(-1, keepdim=True), c

    def grad_rows(self, s, t, c):
        lm = self._log_mix(s, t)
        r = t.add_(s).sub_(lm).exp_()  # p q / m
        return s.exp_().mul_(c).sub_(r).mul_(1.0 - self.alpha)  # (1-a) (p sum r - r)

    def bucket(self, s, t):
        return w_diff(t.exp(), t, self._log_mix(s, t))

    def elementwise(self, s, t):
        return t.exp() * (t - self._log_mix(s, t))


__all__ = ["SkewKL"]
