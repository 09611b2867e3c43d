"""The diagnosis report (``report.json``) as a type: ``DiagnosisReport`` is the one reader and writer of
the file. Surgery, evaluation and the pipeline take a selection from it (``selection(k)``) and check it
against a model (``check``) instead of reading keys; it lives on the ground floor so that they need
nothing else of the diagnosis stage. Written to a temporary name and renamed, so a good report is never
replaced by a partial one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rad_ds.core.io import write_json_atomic
from rad_ds.core.layers import attention_layers


class ReportError(ValueError):
    """A report that cannot be used as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class Selection:
    """The attention layers chosen for one k, with their scores."""

    k: int
    layers: tuple[int, ...]  # sorted
    method: str
    acceptance_rate: float | None
    mean_accepted_length: float | None
    estimated_speedup: float | None
    measured_speedup: float | None


class DiagnosisReport:
    """``report.json``: the model diagnosed, per-layer redundancy, and one selection per k."""

    FILE = "report.json"
    CHART = "redundancy.png"

    def __init__(self, data: dict, path: Path | None = None, what: str = "--report"):
        self.data, self.path, self.what = data, path, what  # ``what``: the setting that named the file

    @classmethod
    def load(cls, path: str | Path, what: str = "--report") -> "DiagnosisReport":
        p = Path(path)
        if p.is_dir():
            p = p / cls.FILE
        if not p.is_file():
            raise FileNotFoundError(f"{what} {p}: file not found (a diagnosis report.json)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{what} {p}: not valid JSON ({e.msg}); give a diagnosis report.json") from None
        sels = data.get("selections") if isinstance(data, dict) else None
        if not isinstance(sels, list) or not sels or not all(isinstance(s, dict) and "k" in s for s in sels):
            raise ReportError(f"{what} {p}: no 'selections'; is this a report.json from launchers/diagnose.py?")
        return cls(data, p, what)

    def write(self, out: str | Path) -> Path:
        self.path = write_json_atomic(Path(out) / self.FILE, self.data)
        return self.path

    def __getitem__(self, key: str):
        return self.data[key]

    @property
    def model(self) -> str | None:
        return self.data.get("model")

    @property
    def ks(self) -> list[int]:
        return sorted(int(s["k"]) for s in self.data["selections"])

    def selection(self, k: int) -> Selection:
        for s in self.data["selections"]:
            if int(s["k"]) == int(k):
                return Selection(int(s["k"]), tuple(sorted(int(i) for i in s["layers"])), s.get("method", ""),
                                 s.get("acceptance_rate"), s.get("mean_accepted_length"), s.get("estimated_speedup"),
                                 s.get("measured_speedup"))
        raise ReportError(f"{self._where()}: no selection for k={k}; available k: {self.ks}")

    def check(self, model_config) -> None:
        """Refuse a report made for a model with another layer count or attention layout."""
        attn = attention_layers(model_config)
        rep_attn = [int(x["index"]) for x in self.data.get("layers") or [] if x.get("type", "attention") == "attention"]
        n_rep = self.data.get("num_hidden_layers")
        if (n_rep is not None and int(n_rep) != model_config.num_hidden_layers) or (rep_attn and rep_attn != attn):
            raise ReportError(
                f"{self._where()} was made for model {self.model!r} with attention layers {rep_attn}; "
                f"this model has attention layers {attn}. Diagnose this model, or pass the matching report"
            )

    def provenance(self, k: int) -> dict:
        """What a student records about where its layers came from."""
        return {"report": str(self.path), "k": int(k), "report_model": self.model}

    def summary_table(self) -> str:
        return summary_table(self.data)

    def scored_on(self) -> str:
        """One line: the acceptance signal and what the masks were scored on."""
        return _scored_on(self.data)

    def _where(self) -> str:
        return f"{self.what} {self.path}"


def _scored_on(report: dict) -> str:
    """One line: the signal and what it scored (newer reports)."""
    st, data = report.get("settings") or {}, report.get("data")
    signal = st.get("signal", "greedy")
    what = (f"{data['positions']} positions of {data['windows']} documents of {data['path']}" if data else
            f"{(report.get('prompts') or {}).get('n', '?')} prompts' continuations")
    if st.get("scored_on") == "both" and data:
        what += f" and {(report.get('prompts') or {}).get('n', '?')} prompts' continuations"
    kind = (f"expected acceptance of speculative sampling at T={st.get('temperature', 1.0)}" if signal == "expected"
            else "greedy acceptance")
    return f"Signal: {kind}, on {what}."


def summary_table(report: dict) -> str:
    rows = [_scored_on(report), "",
            "| k | layers | method | acceptance | mean accepted | est. speed-up | measured speed-up |",
            "|---|---|---|---|---|---|---|"]
    for s in sorted(report["selections"], key=lambda s: s["k"]):
        meas = "-" if s.get("measured_speedup") is None else f"{s['measured_speedup']:.2f}x"
        rows.append(f"| {s['k']} | {','.join(map(str, s['layers']))} | {s.get('method', '')} | "
                    f"{s['acceptance_rate']:.3f} | {s['mean_accepted_length']:.2f} | "
                    f"{s['estimated_speedup']:.2f}x | {meas} |")
    return "\n".join(rows + _gains_table(report))


def _gains_table(report: dict) -> list[str]:
    """The selection against the baselines, on the search's prompts and on held-out ones (newer reports)."""
    sels = sorted((s for s in report["selections"] if s.get("gains")), key=lambda s: s["k"])
    if not sels:
        return []
    held = {h["k"]: h for h in (report.get("held_out") or {}).get("selections") or []}
    ho = report.get("held_out") or {}
    n_held = (f"{ho['positions']} positions of {ho['documents']} documents" if ho.get("documents") else
              f"{ho.get('n', 0)} prompts")

    def gain(g, m, key):
        return f"{g[m][key]:+.3f}" if m in g else "-"

    rows = ["", f"Gain of the selection in acceptance rate (objective) over each baseline; held-out: the same on "
                f"{n_held} the search did not see", "",
            "| k | vs single-skip top-k | vs greedy | vs TPE | held-out acceptance | held-out vs single-skip top-k "
            "| held-out vs greedy |", "|---|---|---|---|---|---|---|"]
    for s in sels:
        g = s["gains"]
        cells = [f"{gain(g, m, 'acceptance_rate')} ({gain(g, m, 'objective')})" if m in g else "-"
                 for m in ("single_skip_topk", "greedy", "bo")]
        h = held.get(s["k"])
        hcells = ["-", "-", "-"] if h is None else [f"{h['acceptance_rate']:.3f}"] + [
            gain(h["gains"], m, "acceptance_rate") for m in ("single_skip_topk", "greedy")]
        rows.append(f"| {s['k']} | " + " | ".join(cells + hcells) + " |")
    return rows


__all__ = ["DiagnosisReport", "ReportError", "Selection", "summary_table"]
