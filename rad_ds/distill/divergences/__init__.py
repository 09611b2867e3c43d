"""KD divergences: ``REGISTRY`` maps each ``loss.kd`` name to its :class:`Divergence` class (one file each).

Add one: a file with a :class:`Divergence` subclass and a line below (or :func:`register` it at run time);
the run config's choices, ``--help`` and every loss path pick it up. See docs/extending.md.
"""

from __future__ import annotations

from .base import REGISTRY, Divergence, get, register, resolve, unregister, w_diff
from .forward_kl import ForwardKL
from .jsd import JSD
from .reverse_kl import ReverseKL
from .skew_kl import SkewKL
from .skew_rkl import SkewRKL
from .tv import TotalVariation

register(ForwardKL)
register(ReverseKL)
register(JSD)
register(SkewKL)
register(SkewRKL)
register(TotalVariation)

__all__ = [
    "JSD", "REGISTRY", "Divergence", "ForwardKL", "ReverseKL", "SkewKL", "SkewRKL", "TotalVariation", "get",
    "register", "resolve", "unregister", "w_diff",
]
