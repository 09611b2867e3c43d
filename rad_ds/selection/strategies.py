"""``choose_layers``, the one entry that runs any placement strategy of the registry (``registry.STRATEGIES``: the
names, what each reads, their functions)."""

from __future__ import annotations

from rad_ds.models.conversion import load_config, load_model

from .choice import Choice, Inputs, SelectionError
from .registry import METHODS, NEEDS_REPORT, NEEDS_WEIGHTS, get_strategy


def _model_and_config(model, weights: bool):
    """(loaded model or None, config) of a model, a config or a path (weights loaded only when needed)."""
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
    strategy = get_strategy(method)
    if strategy.needs_report and report is None:
        raise SelectionError(f"student.placement={method} reads a diagnosis report: give student.report "
                             "(launchers/diagnose.py --k K writes one)")
    loaded, config = _model_and_config(model, strategy.needs_weights)
    return strategy.choose(k, Inputs(config, loaded, report, calibration, seed))


__all__ = ["METHODS", "NEEDS_REPORT", "NEEDS_WEIGHTS", "choose_layers"]
