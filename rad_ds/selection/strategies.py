"""The named placement strategies and ``choose_layers``, the one entry that runs any of them.

| name | reads | chooses |
|---|---|---|
| ``rad`` | a diagnosis report | the report's selection for k (skip-set search with the top-k step) |
| ``single_skip`` | a diagnosis report | top-k of the per-layer single-skip acceptance rates |
| ``even`` | the layer layout | MambaInLlama's spacing, every (n/k)-th attention layer from layer 0 |
| ``random`` | the layer layout, a seed | k distinct layers drawn by ``numpy.random.default_rng(seed)`` |
| ``cosine`` | weights, calibration tokens | k lowest ``1 - cos(h, h + attn(h))`` (LLM-Drop) |
| ``kl_probe`` | weights, calibration tokens | k lowest KL(teacher || one layer replaced at init) |
"""

from __future__ import annotations

import time

from .choice import Choice, SelectionError
from .cosine import cosine_choice
from .from_report import rad_choice, single_skip_choice
from .kl_probe import kl_probe_choice
from .spacing import attention_layers, even_layers, random_layers

METHODS = ("rad", "single_skip", "even", "random", "cosine", "kl_probe")
NEEDS_REPORT = ("rad", "single_skip")
NEEDS_WEIGHTS = ("cosine", "kl_probe")


def _model_and_config(model, weights: bool):
    """(loaded model or None, config) of a model, a config or a path (weights loaded only when needed)."""
    from rad_ds.models.conversion import load_config, load_model

    if hasattr(model, "config") and hasattr(model, "model"):
        return model, model.config
    if hasattr(model, "layer_types"):
        if weights:
            raise SelectionError("this placement reads weights: give the model (or its path), not only its config")
        return None, model
    if weights:
        loaded, _ = load_model(model)
        return loaded, loaded.config
    return None, load_config(model)


def choose_layers(method: str, k: int, model, *, report=None, calibration=None, seed: int = 0) -> Choice:
    """The k attention layers ``method`` picks for ``model`` (a ``RadHybridForCausalLM``, its config, or a path).

    ``report``: a diagnosis report.json or ``DiagnosisReport`` (rad, single_skip); ``calibration``: token-id
    sequences (cosine, kl_probe; ``calibration_tokens`` builds them from a data file); ``seed``: random's draw and
    kl_probe's Mamba2 init. The returned ``Choice`` carries the method's cost of choosing."""
    if method not in METHODS:
        raise SelectionError(f"student.placement = {method!r}: use one of {', '.join(METHODS)}")
    if method in NEEDS_REPORT and report is None:
        raise SelectionError(f"student.placement={method} reads a diagnosis report: give student.report "
                             "(launchers/diagnose.py --k K writes one)")
    loaded, config = _model_and_config(model, method in NEEDS_WEIGHTS)
    if method == "rad":
        return rad_choice(report, k, config)
    if method == "single_skip":
        return single_skip_choice(report, k, config)
    if method == "cosine":
        return cosine_choice(loaded, k, calibration)
    if method == "kl_probe":
        return kl_probe_choice(loaded, k, calibration, seed=seed)
    cands = attention_layers(config)
    t0 = time.perf_counter()
    if method == "even":
        layers, details = even_layers(cands, k), {"formula": "attention_layers[floor(j * n / k)], j = 0..k-1"}
    else:
        layers, details = random_layers(cands, k, seed), {"seed": int(seed)}
    return Choice(layers, method, int(k), time.perf_counter() - t0, 0, details=details)


__all__ = ["METHODS", "NEEDS_REPORT", "NEEDS_WEIGHTS", "choose_layers"]
