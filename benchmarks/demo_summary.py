"""The README demo as a results file: a finished `bash scripts/demo.sh` run (`runs/rad-demo`) summarised into
`benchmarks/results/demo_cpu.json` (the base's and the student's held-out perplexity, read through `EvalResults`,
against the target of a student within 5% of the base; the diagnosis' selections from its `report.json`; the
run's final output `comparison.md`, verbatim; its settings) and `demo_cpu.md` rendered from that JSON alone.

    bash scripts/demo.sh && python benchmarks/demo_summary.py --run runs/rad-demo --wall-s SECONDS
    python benchmarks/demo_summary.py --render          # re-render demo_cpu.md from demo_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "demo_cpu.json"
TARGET = 1.05  # student perplexity / base perplexity


def _mtime(path: Path) -> str:
    t = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return t.isoformat(timespec="seconds")


def _diagnosis(report: dict) -> dict:
    """The report's settings, data and selections (what the README quotes), and every layer's single-skip score."""
    keep = ("k", "method", "layers", "acceptance_rate", "mean_alpha", "mean_accepted_length", "estimated_speedup",
            "measured_speedup", "measured_acceptance_rate")
    return {"signal": report["settings"]["signal"], "temperature": report["settings"]["temperature"],
            "world_size": report["settings"].get("world_size"), "data": report.get("data"),
            "evaluated_masks": report["evaluated_masks"], "seconds": report["seconds"],
            "selections": [{k: s.get(k) for k in keep} for s in report["selections"]],
            "single_skip_mean_alpha": {str(x["index"]): x["mean_alpha"] for x in report["layers"]
                                       if x.get("mean_alpha") is not None}}


def summarise(run: Path, wall_s: float | None) -> dict:
    from rad_ds.core.provenance import provenance
    from rad_ds.eval.results import EvalResults

    res = EvalResults.load(run / "eval")
    base, student = (res.score(m, "ppl")["score"] for m in res.models)
    pipeline = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").is_file() else {}
    comparison = run / "comparison.md"
    try:
        shown = str(run.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(run)
    return {"benchmark": "demo", "provenance": provenance(), "config": "configs/rad_demo.yaml", "run": shown,
            "run_finished": _mtime(comparison),
            "base_ppl": base, "student_ppl": student, "student_over_base": student / base,
            "target_student_over_base": TARGET, "met": student / base <= TARGET,
            "ppl_data": "HumanEval programs + reasoning-gym GSM solutions (n=8)", "wall_s": wall_s,
            "diagnosis": _diagnosis(json.loads((run / "diagnosis" / "report.json").read_text())),
            "comparison_md": comparison.read_text(), "pipeline": pipeline}


def render(out: dict) -> str:
    """``demo_cpu.md``, from the JSON alone (``--render`` rewrites it)."""
    from rad_ds.core.provenance import provenance_line

    d = out["diagnosis"]
    wall = f"{out['wall_s'] / 60:.1f} min wall (`time bash scripts/demo.sh`)" if out.get("wall_s") else "wall time "\
        "not measured"
    data = d.get("data") or {}
    alpha = sorted(((float(v), int(k)) for k, v in d["single_skip_mean_alpha"].items()), reverse=True)
    md = [f"# `bash scripts/demo.sh` ({out['config']})", "",
          f"The run in `{out['run']}`, finished {out['run_finished']}; {wall}. Held-out perplexity "
          f"({out['ppl_data']}): base {out['base_ppl']:.3f}, student {out['student_ppl']:.3f}, "
          f"**{out['student_over_base']:.3f}x** the base's (target <= {out['target_student_over_base']}x: "
          f"{'met' if out['met'] else 'not met'}).", "",
          "## The demo's final output (`comparison.md`)", "", "```", out["comparison_md"].rstrip("\n"), "```", "",
          f"## The diagnosis (`diagnosis/report.json`: {d['signal']} acceptance at T={d['temperature']}, "
          f"{data.get('positions', '?')} positions of {data.get('windows', '?')} windows of `{data.get('path', '?')}`, "
          f"{d['evaluated_masks']} masks, {d['world_size'] or 1} rank(s), {d['seconds']:.0f} s)", "",
          "| k | layers | method | acceptance | mean alpha | mean accepted | est. speed-up | measured speed-up | "
          "measured acceptance |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in d["selections"]:
        measured = f"{s['measured_speedup']:.2f}x" if s.get("measured_speedup") is not None else "-"
        macc = f"{s['measured_acceptance_rate']:.2f}" if s.get("measured_acceptance_rate") is not None else "-"
        md.append(f"| {s['k']} | {','.join(map(str, s['layers']))} | {s['method']} | {s['acceptance_rate']:.3f} | "
                  f"{s['mean_alpha']:.3f} | {s['mean_accepted_length']:.2f} | {s['estimated_speedup']:.2f}x | "
                  f"{measured} | {macc} |")
    md += ["", "Single-skip mean alpha (each attention layer skipped alone): highest "
           + ", ".join(f"layer {i} {a:.3f}" for a, i in alpha[:3]) + "; lowest "
           + ", ".join(f"layer {i} {a:.3f}" for a, i in alpha[-2:][::-1]) + ".", "",
           provenance_line(out["provenance"])]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    from rad_ds.core.provenance import RENDER_HELP, render_only, write_results

    if render_only(render, DEFAULT_OUT, argv):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "rad-demo"))
    ap.add_argument("--wall-s", type=float, default=None, help="wall time of the demo command, if measured")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args(argv)
    out = summarise(Path(a.run), a.wall_s)
    write_results(a.out, out, render)
    print(f"base ppl {out['base_ppl']:.3f}, student ppl {out['student_ppl']:.3f} ({out['student_over_base']:.3f}x; "
          f"target <= {TARGET}x)")


if __name__ == "__main__":
    main()
