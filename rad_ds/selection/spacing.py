"""Placements that look at no weights: MambaInLlama's fixed spacing (``even``) and seeded ``random`` layers.

``even`` follows MambaInLlama (Wang et al. 2024, github.com/jxiw/MambaInLlama): its configs for Llama-3-8B (32
layers) list the replaced layers as ``ssm_layers``: 25% ``[0, 4, ..., 28]``, 50% ``[0, 2, ..., 30]``, 75% ``[0, 1,
2, 4, 5, 6, ...]`` (attention kept at 3, 7, ..., 31), 87.5% (attention kept at 7, 15, 23, 31). All four are
``floor(j * n / k)`` for ``j = 0..k-1``: every (n/k)-th layer starting at layer 0. Here ``n`` counts the attention
layers (a model that is already a hybrid spaces over its remaining attention layers)."""

from __future__ import annotations

import time

import numpy as np

from rad_ds.core.layers import attention_layers

from .choice import Choice, Inputs, SelectionError


def check_k(k, candidates: list[int], what: str = "student.k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= len(candidates):
        raise SelectionError(f"{what} = {k!r}: give a number of layers in [1, {len(candidates)}] (the model's "
                             "attention layers)")
    return int(k)


def even_layers(candidates: list[int], k: int) -> tuple[int, ...]:
    """MambaInLlama's spacing: ``candidates[floor(j * n / k)]`` for j in 0..k-1 (n = len(candidates))."""
    n = len(candidates)
    k = check_k(k, candidates)
    return tuple(candidates[(j * n) // k] for j in range(k))


def random_layers(candidates: list[int], k: int, seed: int) -> tuple[int, ...]:
    """k distinct candidates drawn by ``numpy.random.default_rng(seed)``, sorted (the same seed, the same layers)."""
    k = check_k(k, candidates)
    rng = np.random.default_rng(int(seed))
    return tuple(sorted(int(i) for i in rng.choice(np.asarray(candidates), size=k, replace=False)))


def even_strategy(k: int, inputs: Inputs) -> Choice:
    """``even`` (registry entry): MambaInLlama's spacing over the config's attention layers."""
    t0 = time.perf_counter()
    layers = even_layers(attention_layers(inputs.config), k)
    return Choice(layers, "even", int(k), time.perf_counter() - t0, 0,
                  details={"formula": "attention_layers[floor(j * n / k)], j = 0..k-1"})


def random_strategy(k: int, inputs: Inputs) -> Choice:
    """``random`` (registry entry): k attention layers drawn with ``inputs.seed``."""
    t0 = time.perf_counter()
    layers = random_layers(attention_layers(inputs.config), k, inputs.seed)
    return Choice(layers, "random", int(k), time.perf_counter() - t0, 0, details={"seed": int(inputs.seed)})


__all__ = ["attention_layers", "check_k", "even_layers", "even_strategy", "random_layers", "random_strategy"]
