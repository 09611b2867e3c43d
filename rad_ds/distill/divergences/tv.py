"""Total variation distance 1/2 sum |p - q|: symmetric, in [0, 1].

With g = sign(p - q) / 2 = dL/dp: dL/dz = p (g - sum p g); the row constant is sum p g."""

from __future__ import annotations

import torch

from .base import Divergence


class TotalVariation(Divergence):
    name = "tv"

    def reference(self, s, t):
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)

    def rows(self, s, t):
        p, q = s.exp_(), t.exp_()
        g = torch.sign(p - q).mul_(0.5)
        return p.sub(q).abs_().sum(-1, keepdim=True).mul_(0.5), g.mul_(p).sum(-1, keepdim=True)

    def grad_rows(self, s, t, c):
        p, q = s.exp_(), t.exp_()
        return torch.sign(p - q).mul_(0.5).sub_(c).mul_(p)  # p (g - sum p g)

    def bucket(self, s, t):
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)

    def elementwise(self, s, t):
        return 0.5 * (s.exp() - t.exp()).abs()


__all__ = ["TotalVariation"]
