"""Placements read from a diagnosis report (``launchers/diagnose.py``), through ``DiagnosisReport`` only.

- ``rad``: the report's selection for k, the best of its skip-set search (optuna TPE over skip masks with the
  top-k step, the single-skip top-k and, if run, the greedy build-up) by estimated self-speculative speed-up.
- ``single_skip``: the k attention layers whose skipping alone keeps the draft's acceptance rate highest
  (the report's per-layer ``redundancy``), ties to the lower index, as the diagnosis' own top-k step.

Their cost is the diagnosis': seconds from the report's timings (set-up + search; the re-check with the real
decoder verifies, it does not choose), forward passes = one draft forward per prompt for every mask evaluated,
plus one greedy continuation per prompt (counted as one pass each, though a decode loop is several)."""

from __future__ import annotations

from pathlib import Path

from rad_ds.core.report import DiagnosisReport, ReportError

from .choice import Choice, Inputs, SelectionError, highest
from .spacing import attention_layers, check_k


def load_report(report, model_config=None, what: str = "student.report") -> DiagnosisReport:
    """A ``DiagnosisReport`` (from a path or as given), checked against ``model_config`` when one is given."""
    try:
        rep = report if isinstance(report, DiagnosisReport) else DiagnosisReport.load(report, what)
        if model_config is not None:
            rep.check(model_config)
    except ReportError as e:
        raise SelectionError(str(e)) from None
    return rep


def _fix(rep: DiagnosisReport, k: int) -> str:
    model = rep.model or "MODEL"
    return f"run launchers/diagnose.py --model {model} --k {k} --out {Path(str(rep.path)).parent}"


def _prompts(rep: DiagnosisReport) -> int:
    """Sequences each mask was scored on: prompts' continuations and document windows."""
    return int((rep.data.get("prompts") or {}).get("n") or 0) + int((rep.data.get("data") or {}).get("windows") or 0)


def _search_seconds(rep: DiagnosisReport) -> float | None:
    b = rep.data.get("seconds_breakdown") or {}
    if "setup" in b and "search" in b:
        return float(b["setup"]) + float(b["search"])
    return None if rep.data.get("seconds") is None else float(rep.data["seconds"])


def rad_choice(report, k: int, model_config=None) -> Choice:
    """The report's selection for ``k``; a report without that k is refused with the command that makes one."""
    rep = load_report(report, model_config)
    try:
        sel = rep.selection(k)
    except ReportError:
        raise SelectionError(f"student.report {rep.path} has no selection for k={k} (it has k {rep.ks}); "
                             f"{_fix(rep, k)}") from None
    n, masks = _prompts(rep), int(rep.data.get("evaluated_masks") or 0)
    secs = _search_seconds(rep)
    return Choice(sel.layers, "rad", int(k), secs if secs is not None else float("nan"), masks * n + n,
                  details={"report": str(rep.path), "report_model": rep.model, "search_method": sel.method,
                           "evaluated_masks": masks, "prompts": n, "estimated_speedup": sel.estimated_speedup,
                           "acceptance_rate": sel.acceptance_rate})


def single_skip_scores(rep: DiagnosisReport) -> dict[int, float]:
    """Per attention layer, the draft's acceptance rate with that layer alone skipped (``layers[i].redundancy``)."""
    rows = [x for x in rep.data.get("layers") or [] if x.get("type", "attention") == "attention"]
    scores = {int(x["index"]): x.get("redundancy") for x in rows}
    if not scores or any(v is None for v in scores.values()):
        raise SelectionError(f"student.report {rep.path} holds no per-layer single-skip scores ('layers[].redundancy');"
                             f" {_fix(rep, max(rep.ks))}")
    return {i: float(v) for i, v in scores.items()}


def single_skip_choice(report, k: int, model_config=None) -> Choice:
    """Top-k of the per-layer single-skip acceptance rates (any k up to the attention layers, not only the report's)."""
    rep = load_report(report, model_config)
    scores = single_skip_scores(rep)
    if model_config is not None:
        check_k(k, attention_layers(model_config))
    else:
        check_k(k, sorted(scores))
    n, masks = _prompts(rep), int(rep.data.get("evaluated_masks") or 0)
    secs = _search_seconds(rep)
    if secs is not None and masks:
        # the report times set-up and search together; the single-skip pass is len(scores) of its masks
        setup = float((rep.data.get("seconds_breakdown") or {}).get("setup", 0.0))
        secs = setup + (secs - setup) * len(scores) / masks
    return Choice(highest(scores, k), "single_skip", int(k), secs if secs is not None else float("nan"),
                  len(scores) * n + n, scores, "draft acceptance rate with the layer alone skipped (highest chosen)",
                  {"report": str(rep.path), "report_model": rep.model, "prompts": n,
                   "seconds_estimated": "setup + search x single-skip masks / evaluated masks"})


def rad_strategy(k: int, inputs: Inputs) -> Choice:
    """``rad`` (registry entry)."""
    return rad_choice(inputs.report, k, inputs.config)


def single_skip_strategy(k: int, inputs: Inputs) -> Choice:
    """``single_skip`` (registry entry)."""
    return single_skip_choice(inputs.report, k, inputs.config)


__all__ = ["load_report", "rad_choice", "rad_strategy", "single_skip_choice", "single_skip_scores",
           "single_skip_strategy"]
