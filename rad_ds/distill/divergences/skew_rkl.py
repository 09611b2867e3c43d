"""Skew reverse KL (DistiLLM, Ko et al. 2024): KL(S || alpha S + (1 - alpha) T), bounded by log(1/alpha).

With lm = log(a p + (1-a) q): dL/dp = (s - lm) + 1 - a p / m, so with u = (s - lm) - a p / m,
dL/dz = p (u - sum p u); the row constant is sum p u."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Divergence, w_diff


class SkewRKL(Divergence):
    name = "skew_rkl"
    defaults = {"alpha": 0.1}
    mixture = "alpha"
    config_keys = {"alpha": "skew_alpha"}

    def check(self):
        self._in_unit_interval("alpha", "skew")

    def _log_mix(self, s, t):
        return torch.logaddexp(s + math.log(self.alpha), t + math.log(1.0 - self.alpha))  # log(a p + (1-a) q)

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
