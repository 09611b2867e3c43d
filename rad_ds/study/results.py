"""``StudyResults``: the placement study's results, the one reader and writer of ``results.json``,
``results.md`` and ``curves.png``.

Layout of ``results.json`` (users' scripts read it; keys are only ever added)::

    {"split": "test", "seeds": [0, 1, 2], "model", "budget",
     "k": {"4": {"rad": {"layers", "test_kl": [one per seed], "ppl": [...], "top1_agreement": [...],
                         "greedy_agreement": [...], "greedy_prefix": [...], "mean": {...}, "ci95": {...},
                         "arithmetic": [final student's exact match, per seed], "arithmetic_n": [...],
                         "passkey": [...], "passkey_n": [...], "passkey_by_context": {"512": [per seed], ...},
                         "initial": {...}, "curve": {"steps": [...], "test_kl": [[per seed] per step]}, ...},
                 "cosine": {...}, "single_skip": {...}, "even": {...},
                 "random": [{"layers", "test_kl": [...], ...} one per draw]},
           "8": {...}},
     "paired": {"4": {"single_skip": {"test_kl_diff": [rad - baseline, per seed], "mean", "ci95"}, ...,
                      "random_median": {...}}},
     "summary": {"4": {"rad_not_worse_than": {baseline: bool}}, ...}, "study_seconds", ...}

``budget.tasks`` holds the arithmetic / passkey settings and the teacher's own scores there (with their Wilson
intervals over the samples); the students' arithmetic and passkey are absent when the study ran with them off.

Every interval is a 95% Student-t interval over training seeds (``rad_ds.core.intervals``). The paired difference
pairs RAD's student and a baseline's trained with the same seed (the same data order); ``random_median`` is the
median over the random draws at each seed (likewise ``<name>_median`` for any strategy whose seed is a draw,
``rad_ds.selection.registry``). The split is the test split: reported, never used to choose anything.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rad_ds.core.intervals import mean_interval
from rad_ds.core.io import write_json_atomic, write_text_atomic
from rad_ds.core.provenance import provenance
from rad_ds.selection.registry import STRATEGIES, names

from .heldout import TaskScores

METRICS = ("heldout_kl", "ppl", "top1_agreement", "greedy_agreement", "greedy_prefix")
REPORTED = {"heldout_kl": "test_kl", "ppl": "ppl", "top1_agreement": "top1_agreement",
            "greedy_agreement": "greedy_agreement", "greedy_prefix": "greedy_prefix"}
TASK_METRICS = TaskScores.NAMES  # generation tasks, scored on the final student only
NOTE = ("test split: the numbers are reported, never used to choose layers, settings or defaults (those were chosen "
        "on the validation split or the training data)")


def baselines() -> tuple[str, ...]:
    """What RAD's students are compared with, pairwise: every other registered strategy, in the table's order; one
    whose seed is a draw by the median over its draws (``<name>_median``)."""
    return tuple(f"{n}_median" if STRATEGIES[n].seed == "draw" else n for n in names() if n != "rad")


def _entry(arms: list[dict], seeds: list[int]) -> dict:
    """One placement's students (one per seed) -> its per-seed scores, means, intervals and curves."""
    by_seed = {a["seed"]: a for a in arms}
    first = arms[0]
    out = {"layers": list(first["choice"]["layers"]),
           "initial": {REPORTED[m]: first["curve"][0].get(m) for m in METRICS},
           "selection_seconds": first["choice"].get("seconds"),
           "diagnosis_seconds": first["choice"].get("diagnosis_seconds"),
           "selection_forward_passes": first["choice"].get("forward_passes"),
           "runs": [by_seed[s]["run"] for s in seeds],
           "train_seconds": [by_seed[s].get("train_seconds") for s in seeds],
           "exports": [by_seed[s].get("export") for s in seeds]}
    if first.get("draw") is not None:
        out["draw"] = first["draw"]
    for m in METRICS:
        out[REPORTED[m]] = [by_seed[s]["curve"][-1][m] for s in seeds]
    out["mean"], out["ci95"] = {}, {}
    for m in METRICS:
        out["mean"][REPORTED[m]], out["ci95"][REPORTED[m]] = mean_interval(out[REPORTED[m]])
    for m in TASK_METRICS:  # absent when the study ran without them (or a final point scored before they existed)
        final = [by_seed[s]["curve"][-1] for s in seeds]
        if all(f.get(m) is not None for f in final):
            out[m] = [f[m] for f in final]
            out[f"{m}_n"] = [f.get(f"{m}_n") for f in final]
            out["mean"][m], out["ci95"][m] = mean_interval(out[m])
            if all(f.get(f"{m}_by_context") for f in final):
                out[f"{m}_by_context"] = {c: [f[f"{m}_by_context"].get(c) for f in final]
                                          for c in final[0][f"{m}_by_context"]}
    steps = [p["step"] for p in by_seed[seeds[0]]["curve"]]
    out["curve"] = {"steps": steps, "test_kl": [[by_seed[s]["curve"][i]["heldout_kl"] for s in seeds]
                                                for i in range(len(steps))],
                    "top1_agreement": [[by_seed[s]["curve"][i]["top1_agreement"] for s in seeds]
                                       for i in range(len(steps))],
                    "tokens": [p.get("tokens", 0) for p in by_seed[seeds[0]]["curve"]]}
    return out


def _paired(rad: list[float], base: list[float]) -> dict:
    diff = [a - b for a, b in zip(rad, base, strict=True)]
    mean, ci = mean_interval(diff)
    return {"test_kl_diff": diff, "mean": mean, "ci95": ci, "rad_not_worse": mean <= 0}


class StudyResults:
    FILE, TABLE, CHART = "results.json", "results.md", "curves.png"

    def __init__(self, data: dict):
        self.data = data

    @classmethod
    def build(cls, cfg, arms: list[dict], budget: dict, wall: dict, distinct_runs: int | None = None) -> StudyResults:
        """``arms``: one dict per (placement, seed) with ``key, method, k, draw, seed, choice, run, curve``;
        ``wall``: ``WallClock.tick()`` (the study's seconds over all invocations, this one's, their count)."""
        seeds = list(cfg.seeds)
        per_k: dict = {}
        for k in cfg.k:
            groups: dict[str, list[dict]] = {}
            for a in arms:
                if a["k"] == k:
                    groups.setdefault(a["key"], []).append(a)
            methods: dict = {}
            for key, group in groups.items():
                entry = _entry(group, seeds)
                method = group[0]["method"]
                if group[0].get("draw") is not None:  # one placement per draw: a list, and their median below
                    methods.setdefault(method, []).append(entry)
                else:
                    methods[method] = entry
            per_k[str(k)] = methods
        paired, summary = {}, {}
        for k, methods in per_k.items():
            for name, draws in [(n, x) for n, x in methods.items() if isinstance(x, list)]:
                med = [statistics.median(r["test_kl"][i] for r in draws) for i in range(len(seeds))]
                mean, ci = mean_interval(med)
                methods[f"{name}_median"] = {"test_kl": med, "mean": {"test_kl": mean}, "ci95": {"test_kl": ci}}
            if "rad" not in methods:
                continue
            paired[k] = {b: _paired(methods["rad"]["test_kl"], methods[b]["test_kl"])
                         for b in baselines() if b in methods}
            summary[k] = {"rad_not_worse_than": {b: p["rad_not_worse"] for b, p in paired[k].items()},
                          "rad_best_mean_test_kl": all(p["mean"] <= 0 for p in paired[k].values())}
        note = NOTE if cfg.split == "test" else ("validation split: the study was used to choose a setting; its "
                                                 "numbers are not a test result")

        return cls({"split": cfg.split, "note": note, "provenance": provenance(), "model": cfg.model.source,
                    "seeds": seeds, "budget": budget,
                    "k": per_k, "paired": paired, "summary": summary, "distinct_runs": distinct_runs,
                    "study_seconds": wall["seconds"], "study_seconds_this_invocation": wall["this_invocation_seconds"],
                    "invocations": wall["invocations"]})

    @classmethod
    def load(cls, out: str | Path) -> StudyResults:
        return cls(json.loads((Path(out) / cls.FILE).read_text()))

    def rows(self, k: str):
        """(label, entry) for every placement of ``k``: methods in order, each draw of a drawn method (random)."""
        methods = self.data["k"][k]
        for name, r in methods.items():
            if name.endswith("_median") and isinstance(methods.get(name[: -len("_median")]), list):
                continue
            if isinstance(r, list):
                yield from ((f"{name} d{x.get('draw', i)}", x) for i, x in enumerate(r))
            else:
                yield name, r

    def markdown(self) -> str:
        d, b = self.data, self.data["budget"]
        n = len(d["seeds"])
        lines = [f"# Placement study: {d['model']}, k = {', '.join(d['k'])}", "",
                 f"**Split: {d['split']}** ({d['note']}).", "",
                 f"Every student: {b['steps']} steps of {b['micro_batch']} x {b['seq_len']} tokens (grad_accum "
                 f"{b['grad_accum']}), lr {b['lr']} ({b['schedule']}), init {b['init']}, {b['stage1_steps']} "
                 "layer-wise "
                 f"steps then {b['kd']} on the logits"
                 + (f" from a shared teacher cache (k={b['teacher_cache_k']}, built in "
                    f"{b['teacher_cache_seconds']:.0f} s)" if b['teacher_cache_k'] else "")
                 + f"; training seeds {d['seeds']} (seed s: the same data order for every method). Test: "
                 f"{b['heldout_positions']} positions, {b['heldout_prompts']} prompts ({b['test']}). Means over the "
                 f"{n} seeds with 95% Student-t intervals."]
        for k in d["k"]:
            lines += ["", f"## k = {k}", "",
                      "| method | layers | test KL: init -> final, mean [95% CI] | per seed | ppl | top-1 agr. | "
                      "greedy agr. | choosing (s) |", "|---|---|---|---|---:|---:|---:|---:|"]
            for label, r in self.rows(k):
                ci = r["ci95"]["test_kl"]
                ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                lines.append(
                    f"| {label} | {r['layers']} | {r['initial']['test_kl']:.3f} -> "
                    f"**{r['mean']['test_kl']:.3f}**{ci_s} "
                    f"| {', '.join(f'{x:.3f}' for x in r['test_kl'])} | {r['mean']['ppl']:.3f} | "
                    f"{r['mean']['top1_agreement']:.3f} | {r['mean']['greedy_agreement']:.3f} | "
                    f"{(r['selection_seconds'] or 0):.1f} |")
            for name, draws in d["k"][k].items():
                rm = d["k"][k].get(f"{name}_median") if isinstance(draws, list) else None
                if rm:
                    lines.append(f"| {name} (median of draws) | | **{rm['mean']['test_kl']:.3f}** | "
                                 f"{', '.join(f'{x:.3f}' for x in rm['test_kl'])} | | | | |")
            lines += self._task_table(k)
            p = d["paired"].get(k)
            if p:
                lines += ["", "Paired difference of test KL, RAD minus the baseline (same seed, same data order; < 0: "
                              "RAD better):", "", "| baseline | per seed | mean [95% CI] | RAD <= baseline |",
                          "|---|---|---|---|"]
                for base, x in p.items():
                    ci = f" [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}]" if x["ci95"] else ""
                    lines.append(f"| {base} | {', '.join(f'{v:+.4f}' for v in x['test_kl_diff'])} | "
                                 f"{x['mean']:+.4f}{ci} | {'yes' if x['rad_not_worse'] else '**no**'} |")
        runs = d.get("distinct_runs")
        inv = d.get("invocations", 1)
        p = d.get("provenance") or {}
        lines += ["", f"Students distilled: {runs} (placements that agree share their runs)." if runs else "",
                  f"Study wall time: {d['study_seconds'] / 60:.1f} min"
                  + (f" over {inv} invocations (this one {d['study_seconds_this_invocation'] / 60:.1f} min)."
                     if inv > 1 else ".")]
        if p:
            lines.append(f"Made by `{p['command']}` at commit {(p['commit'] or '?')[:10]}"
                         f"{' (dirty tree)' if p['dirty'] else ''} on {p['date']}.")
        return "\n".join(x for x in lines) + "\n"

    def _task_table(self, k: str) -> list[str]:
        """The final students' arithmetic and passkey (means over seeds, Student-t 95%), beside the teacher's."""
        rows = [(label, r) for label, r in self.rows(k) if any(m in r for m in TASK_METRICS)]
        if not rows:
            return []
        teacher = (self.data["budget"].get("tasks") or {}).get("teacher") or {}
        contexts = list(next((r.get("passkey_by_context") for _, r in rows if r.get("passkey_by_context")), {}))
        cols = [m for m in TASK_METRICS if any(m in r for _, r in rows)]
        head = cols + [f"passkey @{c}" for c in contexts]

        def fmt(x, ci=None):
            return "-" if x is None else f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

        def mean(xs):
            xs = [x for x in xs or [] if x is not None]
            return statistics.fmean(xs) if xs else None

        lines = ["", "Final students on generation tasks (exact match; mean over seeds [95% Student-t]; the teacher: "
                     "its score [Wilson 95%] on the same samples):", "",
                 "| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        if teacher:
            cells = [fmt(teacher.get(m), teacher.get(f"{m}_ci95")) for m in cols]
            cells += [fmt((teacher.get("passkey_by_context") or {}).get(c)) for c in contexts]
            lines.append("| teacher | " + " | ".join(cells) + " |")
        for label, r in rows:
            cells = [fmt(r["mean"].get(m), r["ci95"].get(m)) for m in cols]
            cells += [fmt(mean((r.get("passkey_by_context") or {}).get(c))) for c in contexts]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines

    def chart(self, path: Path) -> Path:
        """Test KL over steps per method and k: the mean over seeds and a band from the lowest to the highest seed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = list(self.data["k"])
        fig, axes = plt.subplots(1, len(ks), figsize=(6.5 * len(ks), 4.4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for label, r in self.rows(k):
                steps, kl = r["curve"]["steps"], r["curve"]["test_kl"]
                mean = [statistics.fmean(x) for x in kl]
                lo, hi = [min(x) for x in kl], [max(x) for x in kl]
                rnd = "draw" in r  # one of several draws: drawn thin
                line = ax.plot(steps, mean, label=label, lw=1 if rnd else 2, ls="--" if rnd else "-",
                               marker=None if rnd else "o", ms=3, alpha=0.6 if rnd else 1.0)[0]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.08 if rnd else 0.2, lw=0)
            ax.set_yscale("log")
            ax.set_title(f"k = {k}: test KL(teacher || student), nats/token\n(mean over seeds; band: min-max)",
                         fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Placement study: {self.data['model']} (test split, seeds {self.data['seeds']})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def write(self, out: str | Path) -> None:
        out = Path(out)
        write_json_atomic(out / self.FILE, self.data)
        write_text_atomic(out / self.TABLE, self.markdown())
        self.chart(out / self.CHART)


__all__ = ["METRICS", "TASK_METRICS", "StudyResults", "baselines"]
