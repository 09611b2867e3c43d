"""``StudyResults``: the placement study's results, the one reader and writer of ``results.json``,
``results.md`` and ``curves.png``.

Per method: its layers, its cost of choosing, its held-out curve (every ``eval_every`` steps) and final point,
and ``steps_to_even_final``: the first scored step at which its held-out KL is at or below the final held-out KL
of ``even`` (MambaInLlama's fixed spacing) - the paper's convergence claim as a number of steps; with
``steps_to_even_final_ratio`` = that step / the budget's steps (``None`` where it never gets there). ``random``
is a list (one per seed) with its median and spread.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rad_ds.core.io import write_json_atomic, write_text_atomic

METRICS = ("heldout_kl", "ppl", "top1_agreement", "greedy_agreement", "greedy_prefix")


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first scored step whose held-out KL is <= ``target``."""
    for row in curve:
        if row["heldout_kl"] <= target:
            return int(row["step"])
    return None


class StudyResults:
    FILE, TABLE, CHART = "results.json", "results.md", "curves.png"

    def __init__(self, data: dict):
        self.data = data

    @classmethod
    def build(cls, cfg, arms: dict, budget: dict, wall: dict) -> StudyResults:
        """``wall``: ``WallClock.tick()`` (the study's seconds over all invocations, this one's, their count)."""
        even = next((a for a in arms.values() if a["method"] == "even"), None)
        even_final = even["curve"][-1]["heldout_kl"] if even else None
        methods: dict = {}
        for name, a in arms.items():
            final = a["curve"][-1]
            row = {"name": name, "layers": list(a["choice"]["layers"]), **{m: final.get(m) for m in METRICS},
                   "initial": {m: a["curve"][0].get(m) for m in METRICS},
                   "selection_seconds": a["choice"].get("seconds"),
                   "diagnosis_seconds": a["choice"].get("diagnosis_seconds"),
                   "selection_forward_passes": a["choice"].get("forward_passes"),
                   "train_seconds": a.get("train_seconds"), "export": a.get("export"),
                   "curve": a["curve"], "seed": a["seed"]}
            if even_final is not None:
                s = steps_to_reach(a["curve"], even_final)
                row["steps_to_even_final"] = s
                row["steps_to_even_final_ratio"] = None if s is None else s / budget["steps"]
            if a["method"] == "random":
                methods.setdefault("random", []).append(row)
            else:
                methods[a["method"]] = row
        summary = {}
        if methods.get("random"):
            kls = [r["heldout_kl"] for r in methods["random"]]
            summary["random_heldout_kl_median"] = statistics.median(kls)
            summary["random_heldout_kl_spread"] = [min(kls), max(kls)]
        if "rad" in methods and even_final is not None:
            summary["rad_below_even"] = methods["rad"]["heldout_kl"] < even_final
            if "random_heldout_kl_median" in summary:
                summary["rad_below_random_median"] = methods["rad"]["heldout_kl"] < summary["random_heldout_kl_median"]
        return cls({"model": cfg.model, "k": cfg.k, "budget": budget, "methods": methods, "summary": summary,
                    "study_seconds": wall["seconds"], "study_seconds_this_invocation": wall["this_invocation_seconds"],
                    "invocations": wall["invocations"]})

    @classmethod
    def load(cls, out: str | Path) -> StudyResults:
        return cls(json.loads((Path(out) / cls.FILE).read_text()))

    def rows(self):
        """(label, row) for every student: methods in order, then each random seed."""
        for name, r in self.data["methods"].items():
            if isinstance(r, list):
                yield from ((x["name"], x) for x in r)
            else:
                yield name, r

    def markdown(self) -> str:
        d, b = self.data, self.data["budget"]
        lines = [f"# Placement study: {d['model']}, k = {d['k']}", "",
                 f"Every student: {b['steps']} steps of {b['micro_batch']} x {b['seq_len']} tokens (grad_accum "
                 f"{b['grad_accum']}), lr {b['lr']} ({b['schedule']}), seed {b['seed']}, init {b['init']}, "
                 f"{b['stage1_steps']} layer-wise steps then {b['kd']} on the logits"
                 + (f" from a shared teacher cache (k={b['teacher_cache_k']}, built in "
                    f"{b['teacher_cache_seconds']:.0f} s)" if b['teacher_cache_k'] else "")
                 + f". Held out: {b['heldout_positions']} positions, {b['heldout_prompts']} prompts "
                 f"({b['heldout']}).", "",
                 "| method | layers | held-out KL (init -> final) | ppl | top-1 agr. | greedy agr. | greedy prefix | "
                 "steps to even's final KL | choosing (s) |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in self.rows():
            s = r.get("steps_to_even_final")
            lines.append(
                f"| {label} | {r['layers']} | {r['initial']['heldout_kl']:.3f} -> **{r['heldout_kl']:.3f}** | "
                f"{r['ppl']:.2f} | {r['top1_agreement']:.3f} | {r['greedy_agreement']:.3f} | "
                f"{r['greedy_prefix']:.1f} | {'-' if s is None else s} | "
                f"{(r['selection_seconds'] or 0):.1f} |")
        s = d["summary"]
        if "random_heldout_kl_median" in s:
            lo, hi = s["random_heldout_kl_spread"]
            lines += ["", f"random (median of {len(d['methods']['random'])} seeds): held-out KL "
                          f"{s['random_heldout_kl_median']:.3f} (range {lo:.3f}-{hi:.3f})."]
        if "rad_below_even" in s:
            lines.append(f"rad below even: {s['rad_below_even']}; rad below the random median: "
                         f"{s.get('rad_below_random_median')}.")
        n = d.get("invocations", 1)
        lines += ["", f"Study wall time: {d['study_seconds'] / 60:.1f} min"
                  + (f" over {n} invocations (this one {d['study_seconds_this_invocation'] / 60:.1f} min)." if n > 1
                     else ".")]
        return "\n".join(lines) + "\n"

    def chart(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for label, r in self.rows():
            steps = [p["step"] for p in r["curve"]]
            style = dict(lw=1, alpha=0.5, ls="--") if label.startswith("random") else dict(lw=2, marker="o", ms=3)
            for ax, m in zip(axes, ("heldout_kl", "top1_agreement", "greedy_agreement")):
                ax.plot(steps, [p[m] for p in r["curve"]], label=label, **style)
        for ax, title in zip(axes, ("held-out KL(teacher || student), nats/token", "teacher top-1 agreement",
                                    "greedy agreement with the teacher")):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Placement study: {self.data['model']}, k = {self.data['k']}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def write(self, out: str | Path) -> None:
        out = Path(out)
        write_json_atomic(out / self.FILE, self.data)
        write_text_atomic(out / self.TABLE, self.markdown())
        self.chart(out / self.CHART)


__all__ = ["METRICS", "StudyResults", "steps_to_reach"]
