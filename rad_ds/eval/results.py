"""The outputs of an evaluation, written by rank 0: ``results.json`` (everything), ``results.md`` (the
table: model, task, n, score with its 95% interval, tokens/s, and the speed details),
``samples/<model>/<task>.jsonl`` (every prompt, output and verdict, for reading what a model did), and
optionally a wandb run (offline unless ``WANDB_MODE`` says otherwise)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from rad_ds.core.io import write_json_atomic, write_text_atomic
from rad_ds.core.tracking import start_wandb

logger = logging.getLogger(__name__)


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def write_samples(out: Path, label: str, task: str, records: list[dict]) -> Path:
    path = out / "samples" / safe_name(label) / f"{task}.jsonl"
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    return path


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.1f}"
    return str(x)


def with_interval(x, ci, digits=4) -> str:
    """``x [lo, hi]`` (``x`` alone without an interval)."""
    if not ci:
        return _fmt(x, digits)
    return f"{_fmt(x, digits)} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def markdown(results: dict) -> str:
    rows = results["results"]
    lines = ["# rad-ds evaluation", "",
             f"{results['created']} · {results['world_size']} rank(s) · device {results['device']} · "
             f"seed {results['config']['seed']}", "",
             "| model | task | n | metric | score | ± | tokens/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 1 if r["task"] == "speed" else 4
        lines.append(f"| {r['model']} | {r['task']} | {r['n']} | {r['metric']} | "
                     f"{with_interval(r['score'], r.get('ci95'), digits)} | "
                     f"{_fmt(r.get('stderr'))} | {_fmt(r.get('tokens_per_second'), 1)} |")
    lines += ["", "score [lo, hi]: the 95% interval. Accuracies: Wilson's interval over the n samples (± is the "
              "standard error); perplexity: a percentile bootstrap over the n documents; speed: the median over the "
              "timed repeats, its interval the order statistics around it (see below)."]
    speed = [r for r in rows if r["task"] == "speed"]
    if speed:
        lines += _speed_table(speed)
    lines += ["", "| model | path | layers (A = attention, M = Mamba2) | parameters |", "|---|---|---|---|"]
    for label, m in results["models"].items():
        lines.append(f"| {label} | {m['path']} | `{m['layers']}` | {m['parameters'] / 1e6:.1f}M |")
    sources = {r["task"]: r.get("source") for r in rows if r.get("source")}
    if sources:
        lines += ["", "Data: " + "; ".join(f"{t}: {s}" for t, s in sources.items()) + "."]
    if results.get("sandbox"):
        lines += ["", f"Code ran in the sandbox with: {', '.join(results['sandbox']['guards'])}."]
    return "\n".join(lines) + "\n"


def _speed_table(speed: list[dict]) -> list[str]:
    d0 = speed[0]["details"]
    if "decode_tokens_per_second" not in d0:  # a results.json written before the paired timing
        return []
    cov = d0["decode_tokens_per_second"].get("coverage")
    ref = next((r["details"]["paired"]["against"] for r in speed if r["details"].get("paired")), None)
    lines = ["", f"Decoding speed (batch 1, greedy): medians of {d0['repeats']} repeats, the models timed "
             f"{'round-robin on the same prompts' if d0['order'] == 'interleaved' else 'one after another'}; "
             "intervals [lo, hi] are order statistics of the repeats"
             + (f" (coverage {cov:.1%})" if cov is not None else "") + ". Decode excludes the prompt's forward "
             "pass (prefill, shown apart); speculative = the draft skips the mask's attention layers, its speed-up "
             "is end-to-end.", "",
             "| model | decode tok/s | prefill tok/s | " + (f"decode vs {ref} (paired) | " if ref else "")
             + "plain tok/s (end-to-end) | speculative tok/s | mask | acceptance | mean accepted | speed-up | "
               "same tokens |",
             "|---|---|---|" + ("---|" if ref else "") + "---|---|---|---|---|---|---|"]
    for r in speed:
        d = r["details"]
        spec = d.get("speculative") or {}
        dec, pre = d["decode_tokens_per_second"], d["prefill_tokens_per_second"]
        paired = d.get("paired")
        mask = ",".join(map(str, spec["layers"])) if spec.get("layers") else d.get("speculative_skipped") or "-"
        speedup = spec.get("speedup")
        lines.append(f"| {r['model']} | {with_interval(dec['median'], dec['ci95'], 1)} | "
                     f"{with_interval(pre['median'], pre['ci95'], 1)} | "
                     + ((f"{with_interval(paired['median'], paired['ci95'], 3)} | " if paired else "1 | ")
                        if ref else "")
                     + f"{_fmt(d['plain_tokens_per_second'], 1)} | {_fmt(spec.get('tokens_per_second'), 1)} | "
                     f"{mask} | {_fmt(spec.get('acceptance_rate'), 3)} | {_fmt(spec.get('mean_accepted_length'), 2)} | "
                     f"{with_interval(speedup, spec.get('speedup_ci95'), 2) + ' x' if speedup else '-'} | "
                     f"{spec.get('same_tokens', '-')} |")
    return lines


class EvalResults:
    """``results.json`` (and its table ``results.md``) as a type: the one reader and writer of the files."""

    FILE, TABLE = "results.json", "results.md"

    def __init__(self, data: dict):
        self.data = data

    @classmethod
    def load(cls, out: str | Path) -> "EvalResults":
        p = Path(out)
        p = p / cls.FILE if p.is_dir() else p
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: no evaluation results (run launchers/evaluate.py)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg}); run the evaluation again") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise ValueError(f"{p}: no 'results' list; is this a results.json of launchers/evaluate.py?")
        return cls(data)

    def write(self, out: str | Path) -> tuple[Path, Path]:
        out = Path(out)
        return write_json_atomic(out / self.FILE, self.data), write_text_atomic(out / self.TABLE, markdown(self.data))

    @property
    def rows(self) -> list[dict]:
        return self.data["results"]

    @property
    def models(self) -> dict:
        """label -> {path, layers, parameters, dtype, ...}"""
        return self.data.get("models") or {}

    def score(self, model: str, task: str, metric: str | None = None) -> dict | None:
        """The row of ``model`` on ``task`` (and ``metric``), or None."""
        return next((r for r in self.rows if r["model"] == model and r["task"] == task
                     and (metric is None or r["metric"] == metric)), None)


def write_results(out: Path, results: dict) -> tuple[Path, Path]:
    return EvalResults(results).write(out)


class WandbLog:
    """A wandb run on rank 0, offline unless ``WANDB_MODE`` says otherwise; logging never stops the run."""

    def __init__(self, enabled: bool, project: str, name: str | None, out: Path, config: dict):
        self.run = start_wandb(out, project, name, config, "evaluate") if enabled else None

    def row(self, row: dict) -> None:
        if self.run is None:
            return
        key = f"{row['model']}/{row['task']}"
        vals = {f"{key}/{row['metric']}": row["score"], f"{key}/n": row["n"]}
        if row.get("ci95"):
            vals[f"{key}/ci95_lo"], vals[f"{key}/ci95_hi"] = row["ci95"]
        if row.get("tokens_per_second") is not None:
            vals[f"{key}/tokens_per_second"] = row["tokens_per_second"]
        self.run.log(vals)

    def finish(self, results: dict) -> None:
        if self.run is None:
            return
        import wandb

        cols = ["model", "task", "n", "metric", "score", "stderr", "tokens_per_second"]
        data = [[r.get(c) for c in cols] + list(r.get("ci95") or (None, None)) for r in results["results"]]
        table = wandb.Table(columns=cols + ["ci95_lo", "ci95_hi"], data=data)
        self.run.log({"results": table})
        self.run.finish()


__all__ = ["EvalResults", "WandbLog", "markdown", "safe_name", "with_interval", "write_results", "write_samples"]
