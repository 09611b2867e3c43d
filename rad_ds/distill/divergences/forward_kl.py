"""Forward KL, KL(teacher || student) = sum q (t - s): mass-covering (Hinton et al. 2015; RAD's default).

dL/dz = p - q (softmax Jacobian ``dp/dz = diag(p) - p p^T`` applied to ``dL/dp = -q / p``)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Divergence, w_diff


class ForwardKL(Divergence):
    name = "forward_kl"

    def reference(self, s, t):
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)

    def rows(self, s, t):
        t_minus_s = s.neg_().add_(t)
        d = t_minus_s.mul_(t.exp_()).sum(-1, keepdim=True)  # sum q (t - s)
        return d, d  # the gradient needs no row constant; d stands in (a sum, like any c)

    def grad_rows(self, s, t, c):
        return s.exp_().sub_(t.exp_())  # p - q

    def bucket(self, s, t):
        return w_diff(t.exp(), t, s)

    def elementwise(self, s, t):
        return t.exp() * (t - s)


__all__ = ["ForwardKL"]
