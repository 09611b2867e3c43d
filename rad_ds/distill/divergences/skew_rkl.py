"""Skew reverse KL (DistiLLM, Ko et al. 2024): KL(S || alpha S + (1 - alpha) T), bounded by log(1/alpha).

With lm = log(a p + (1-a) q): dL/dp = (s - lm) + 1 - a p / m, so with u = (s - lm) - a p / m,
dL/dz = p (u - sum p u); the row constant is sum p u."""

from __future__ import annotations

import torch.nn.functional as F

from .base import SkewDivergence, log_mix, w_diff


class SkewRKL(SkewDivergence):
    name = "skew_rkl"

    def _log_mix(self, s, t):
        return log_mix(s, t, self.alpha)  # log(a p + (1-a) q)

    def reference(self, s, t):
        return F.kl_div(self._log_mix(s, t), s, reduction="none", log_target=True).sum(-1)

    def rows(self, s, t):
        lm = self._log_mix(s, t)
        p = s.exp()
        h = s.sub_(lm)  # s - lm
        d = (p * h).sum(-1, keepdim=True)
        u = h.sub_(p.mul(self.alpha).div_(lm.exp_()))  # h - a p / m
        return d, u.mul_(p).sum(-1, keepdim=True)

    def grad_rows(self, s, t, c):
        lm = self._log_mix(s, t)
        p = s.exp()
        u = s.sub_(lm).sub_(p.mul(self.alpha).div_(lm.exp_()))
        return u.sub_(c).mul_(p)  # p (u - sum p u)

    def bucket(self, s, t):
        return w_diff(s.exp(), s, self._log_mix(s, t))

    def elementwise(self, s, t):
        return s.exp() * (s - self._log_mix(s, t))


__all__ = ["SkewRKL"]
