"""The KD divergence interface and its registry: one object per divergence, looked up by name.

A divergence compares the student's next-token distribution ``p = exp(s)`` with the teacher's ``q = exp(t)``
(``s``, ``t``: log-probabilities over the vocabulary, one row per token). The losses in
:mod:`rad_ds.distill.losses` and :mod:`rad_ds.distill.fused` take the temperature, the log-softmax, the
chunking and the T^2 scale; a divergence only says what to compute on a chunk of rows. ``REGISTRY`` is the
one table of names: the run config's ``loss.kd`` choices, its ``--help`` and every dispatch read it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch


class Divergence:
    """One KD divergence ``L(p, q)`` with its named parameters (``defaults``: name -> default value).

    Methods, all per row (the last dimension is the vocabulary or a set of buckets):

    * ``reference(s, t)``: ``L`` in plain torch from the definition, differentiable by autograd (the ``*_ref``
      path and the tests' ground truth).
    * ``rows(s, t) -> (d, c)``: the divergence ``d`` and the gradient's row constant ``c``, both
      ``(chunk, 1)``, from log-probabilities ``s``, ``t`` of shape ``(chunk, V)``, which it may overwrite.
    * ``grad_rows(s, t, c) -> dL/dz``: the gradient w.r.t. the student's logits ``z`` (``s =
      log_softmax(z)``), ``(chunk, V)``, given the ``c`` of ``rows``; may overwrite ``s`` and ``t``.
    * ``bucket(s, t)``: ``L`` between two distributions given as log-probabilities over the same buckets,
      where entries may be -inf (a teacher's top-k plus its tail bucket); differentiable by autograd.

    CONTRACT of ``rows`` and ``grad_rows`` (what a vocabulary-sharded caller relies on): ``d`` and ``c`` are
    each a sum over the last dimension of an elementwise function of ``(s, t)``, and ``grad_rows`` is an
    elementwise function of ``(s, t)`` and the row's ``c``. So with the vocabulary split over ranks, each rank
    calls ``rows`` on its slice of the *globally* normalised ``s`` and ``t``, all-reduces (sums) ``d`` and ``c``,
    and calls ``grad_rows`` on its slice with the summed ``c``.

    A new divergence that defines only ``elementwise(s, t)`` (the per-entry terms ``phi`` with ``L = sum
    phi``) gets all four methods from it: ``dL/dz = g - p sum g`` with ``g = d phi / d s`` (from autograd,
    elementwise). Override ``rows`` / ``grad_rows`` with closed forms working in place where memory matters.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {}
    mixture: ClassVar[str | None] = None  # the parameter that the losses' legacy ``beta`` argument sets
    config_keys: ClassVar[dict[str, str]] = {}  # parameter -> the ``loss.*`` setting that also sets it

    def __init__(self, **params: float) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            takes = ", ".join(self.defaults) or "no parameters"
            raise ValueError(f"KD divergence {self.name!r} got unknown parameter(s) {', '.join(unknown)}; "
                             f"it takes {takes}")
        self.params = {}
        for key, default in self.defaults.items():
            value = params.get(key, default)
            try:
                self.params[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"KD divergence {self.name!r}: {key}={value!r} is not a number") from None
            setattr(self, key, self.params[key])
        self.check()

    def check(self) -> None:
        """Raise a one-line ValueError naming the parameter when a value cannot work."""

    def _in_unit_interval(self, key: str, meaning: str) -> None:
        v = self.params[key]
        if not 0.0 < v < 1.0:
            raise ValueError(f"{self.name} {meaning} {key}={v} must be in (0, 1)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    # -- the generic path, from ``elementwise`` ---------------------------------------------------------
    def elementwise(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-entry terms ``phi(s, t)`` with ``L = sum phi`` over the last dimension."""
        raise NotImplementedError(f"KD divergence {self.name!r} defines neither elementwise() nor {{reference, "
                                  "rows, grad_rows, bucket}}")

    def _phi_and_g(self, s, t):
        with torch.enable_grad():
            x = s.detach().requires_grad_()
            phi = self.elementwise(x, t)
            (g,) = torch.autograd.grad(phi.sum(), x)  # elementwise phi: the partials d phi_v / d s_v
        return phi.detach(), g

    def reference(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.elementwise(s, t).sum(-1)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi, g = self._phi_and_g(s, t)
        return phi.sum(-1, keepdim=True), g.sum(-1, keepdim=True)

    def grad_rows(self, s: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        _, g = self._phi_and_g(s, t)
        return g.sub_(s.exp_().mul_(c))  # g - p sum g

    def bucket(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        empty = torch.isinf(s) & torch.isinf(t)  # a bucket neither side has (the tail when k = V): no term
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        phi = self.elementwise(torch.where(empty, zero, s), torch.where(empty, zero, t))
        return torch.where(empty, zero, phi).sum(-1)


def log_mix(x: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w e^x + (1 - w) e^y)``: the log-probabilities of the mixture ``w X + (1 - w) Y`` of two distributions
    given as log-probabilities ``x`` and ``y`` (JSD's ``M``, the skew divergences' skewed distribution)."""
    return torch.logaddexp(x + math.log(w), y + math.log(1.0 - w))


class SkewDivergence(Divergence):
    """What DistiLLM's two skew divergences (Ko et al. 2024) share: the skew ``alpha`` (0.1 in the paper), also set
    by ``loss.skew_alpha`` and by the losses' legacy ``beta`` argument. Not registered itself."""

    defaults = {"alpha": 0.1}
    mixture = "alpha"
    config_keys = {"alpha": "skew_alpha"}

    def check(self):
        self._in_unit_interval("alpha", "skew")


def w_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum w (a - b) with 0 wherever w is 0 (a or b may be -inf there), NaN-free in backward too."""
    on = w > 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return (w * (torch.where(on, a, zero) - torch.where(on, b, zero))).sum(-1)


REGISTRY: dict[str, type[Divergence]] = {}


def register(cls: type[Divergence]) -> type[Divergence]:
    """Add ``cls`` under ``cls.name`` (usable as a class decorator); a name already taken is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Divergence)) or not cls.name:
        raise ValueError(f"register: {cls!r} is not a Divergence subclass with a name")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"KD divergence {cls.name!r} is already registered ({REGISTRY[cls.name].__name__}); "
                         "pick another name")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a plug-in's or a test's run-time registration)."""
    REGISTRY.pop(name, None)


def get(name: str, **params: float) -> Divergence:
    """The divergence registered as ``name`` with ``params`` (the rest at their defaults)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown KD loss {name!r}; use one of {', '.join(REGISTRY)} (or register one in "
                         "rad_ds.distill.divergences)")
    return cls(**params)


def resolve(kind: str | Divergence, mixture: float | None = None) -> Divergence:
    """``kind`` as a Divergence: an object as is, a name through :func:`get`. ``mixture`` is the losses'
    legacy ``beta`` argument: it sets the divergence's ``mixture`` parameter (JSD's beta, skew's alpha) and
    means nothing to divergences without one."""
    if isinstance(kind, Divergence):
        return kind
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    params = {cls.mixture: mixture} if cls is not None and cls.mixture and mixture is not None else {}
    return get(kind, **params)
