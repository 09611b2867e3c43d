"""Generalised Jensen-Shannon divergence (TRL's GKD): beta KL(T || M) + (1 - beta) KL(S || M), M = beta T +
(1 - beta) S; beta = 0.5 is the symmetric JSD, bounded by log 2.

With lm = log(b q + (1-b) p) and h = s - lm: dL/dp = b q (-(1-b)/m) + (1-b)(h + 1) - (1-b) p (1-b)/m =
(1-b) h (as b q + (1-b) p = m), so dL/dz = (1-b) p (h - sum p h); the row constant is sum p h."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Divergence, log_mix, w_diff


class JSD(Divergence):
    name = "jsd"
    defaults = {"beta": 0.5}
    mixture = "beta"
    config_keys = {"beta": "jsd_beta"}

    def check(self):
        self._in_unit_interval("beta", "mixture weight")

    def _log_mix(self, s, t):
        return log_mix(t, s, self.beta)  # log(b q + (1-b) p)

    def reference(self, s, t):
        m = self._log_mix(s, t)
        kl_t = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
        return self.beta * kl_t + (1.0 - self.beta) * F.kl_div(m, s, reduction="none", log_target=True).sum(-1)

    def rows(self, s, t):
        b = self.beta
        lm = t + math.log(b)
        torch.logaddexp(lm, s + math.log(1.0 - b), out=lm)  # log(b q + (1-b) p)
        kl_t = t.exp().mul_(t.sub_(lm)).sum(-1, keepdim=True)  # sum q (t - lm)
        del t
        p = s.exp()
        c = s.sub_(lm).mul_(p).sum(-1, keepdim=True)  # sum p h
        return b * kl_t + (1.0 - b) * c, c

    def grad_rows(self, s, t, c):
        b = self.beta
        lm = t.add_(math.log(b))
        torch.logaddexp(lm, s + math.log(1.0 - b), out=lm)
        p = s.exp()
        h = s.sub_(lm)
        del lm, t
        return h.sub_(c).mul_(p).mul_(1.0 - b)  # (1-b) p (h - sum p h)

    def bucket(self, s, t):
        m = self._log_mix(s, t)
        return self.beta * w_diff(t.exp(), t, m) + (1.0 - self.beta) * w_diff(s.exp(), s, m)

    def elementwise(self, s, t):
        m = self._log_mix(s, t)
        return self.beta * t.exp() * (t - m) + (1.0 - self.beta) * s.exp() * (s - m)


__all__ = ["JSD"]
