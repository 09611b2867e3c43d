"""Choosing the diagnosis' defaults on the validation split: how far from the full model each way of choosing layers
starts, on documents no choice and no training saw and that the test split does not hold.

With the default ``init: attention_skip`` a student before training is the skip-draft of its layers, and the order
of placements at step 0 is the order after distillation (the placement study's curves, and the issue that led
here). So a placement is judged here by the initial student's KL to the full model on the validation split
(``rad_ds.study.heldout.HeldOut``: mean KL(teacher || student) per counted position, the distillation objective),
and each way of choosing (signal, data, budget, search or single-skip top-k) by the mean over its choices. The
choices are read from results this project already made:

* ``--stability`` (``benchmarks/diagnosis_stability.py``): the default signal's whole search on halves A and B of
  the training data per budget, and every signal's single-skip top-k on the same positions;
* ``--study`` (a placement study's ``placements.json``): the study's own diagnosis on the training data, cosine,
  single-skip, even, random;
* ``--report WAY=report.json`` (repeatable): a diagnosis report's choices (e.g. continuations instead of documents);
* ``--placement NAME:K:L1,L2,...`` (repeatable): any other choice, e.g. the former default's from an older report.

    python benchmarks/placement_validation.py --validation runs/corpus-smollm2/validation/chat.jsonl \
        --stability benchmarks/results/diagnosis_stability_cpu.json --study runs/placement/placements.json

Writes ``benchmarks/results/placement_validation_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def candidates(args) -> list[dict]:
    """Every (way of choosing, k, layers) the given results hold."""
    out = []
    if args.stability:
        st = json.loads(Path(args.stability).read_text())
        main_signal = st["settings"]["signals"][0]
        for row in st["budgets"]:
            b = row["tokens"]
            x = row["signals"][main_signal]
            for h in ("A", "B"):
                for k, sel in x[h]["k"].items():
                    out.append({"way": f"{main_signal} search, documents, {b} positions", "k": int(k),
                                "layers": sel["layers"], "source": f"stability {b} {h}"})
                    ss = sel["baselines"]["single_skip_topk"]["layers"]
                    out.append({"way": f"{main_signal} single-skip top-k, documents, {b} positions", "k": int(k),
                                "layers": ss, "source": f"stability {b} {h}"})
            for sig, y in (row.get("single_skip_only") or {}).items():
                for h in ("A", "B"):
                    for k, layers in y[h]["k"].items():
                        out.append({"way": f"{sig} single-skip top-k, documents, {b} positions", "k": int(k),
                                    "layers": layers, "source": f"stability {b} {h}"})
    if args.study:
        for key, p in json.loads(Path(args.study).read_text()).items():
            m = p["method"]
            way = {"rad": "expected search, documents (study's diagnosis, whole train split)",
                   "single_skip": "expected single-skip top-k (study's diagnosis)"}.get(m, m)
            out.append({"way": way, "k": int(p["k"]), "layers": p["choice"]["layers"], "source": f"study {key}"})
    for spec in args.report or []:
        way, path = spec.split("=", 1)
        for sel in json.loads(Path(path).read_text())["selections"]:
            out.append({"way": f"{way}, search", "k": int(sel["k"]), "layers": sel["layers"], "source": path})
            ss = (sel.get("baselines") or {}).get("single_skip_topk")
            if ss:
                out.append({"way": f"{way}, single-skip top-k", "k": int(sel["k"]), "layers": ss["layers"],
                            "source": path})
    for spec in args.placement or []:
        name, k, layers = spec.split(":")
        out.append({"way": name, "k": int(k), "layers": [int(i) for i in layers.split(",")], "source": "given"})
    return out


def _parser():
    from rad_ds.core.provenance import RENDER_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--validation", required=True, help="the validation split (never trained on, never reported)")
    ap.add_argument("--stability", default=None)
    ap.add_argument("--study", default=None)
    ap.add_argument("--report", action="append", help="WAY=report.json: a diagnosis report's selections and "
                                                       "single-skip top-k (repeatable)")
    ap.add_argument("--placement", action="append", help="NAME:K:L1,L2,... (repeatable)")
    ap.add_argument("--rows", type=int, default=12, help="packed validation rows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                    help="reuse the scores of an earlier --out for the same placements and validation positions")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    return ap


def _earlier_scores(out: Path, validation: str, positions) -> dict[tuple, dict]:
    """The scores an earlier ``out`` holds, by (k, layers), when it scored the same validation positions."""
    scored: dict[tuple, dict] = {}
    if out.is_file():
        prev = json.loads(out.read_text())
        if prev.get("validation") == validation and prev.get("positions") == positions:
            for r in prev["placements"]:
                scored[(r["k"], tuple(r["layers"]))] = {"heldout_kl": r["validation_kl"],
                                                       "top1_agreement": r["validation_top1"]}
    return scored


def _score_placements(cands: list[dict], teacher, ref, scored: dict) -> list[dict]:
    """Each candidate with its initial student's validation KL and top-1 agreement; a placement already in
    ``scored`` is not scored again."""
    from rad_ds.surgery import replace_attention

    rows = []
    for c in cands:
        key = (c["k"], tuple(sorted(c["layers"])))
        if key not in scored:
            student = copy.deepcopy(teacher)
            replace_attention(student, sorted(c["layers"]), init="attention_skip", seed=0)
            scored[key] = ref.evaluate(student.eval())
            log(f"k={c['k']} {sorted(c['layers'])}: validation KL {scored[key]['heldout_kl']:.4f} ({c['way']})")
            del student
        rows.append({**c, "layers": sorted(c["layers"]), "validation_kl": scored[key]["heldout_kl"],
                     "validation_top1": scored[key]["top1_agreement"]})
    return rows


def _by_way(rows: list[dict]) -> dict:
    """Per k, each way of choosing's validation KL (mean, n, min, max), best mean first."""
    ways: dict = {}
    for r in rows:
        ways.setdefault(str(r["k"]), {}).setdefault(r["way"], []).append(r["validation_kl"])
    return {k: {w: {"mean": statistics.fmean(v), "n": len(v), "min": min(v), "max": max(v)}
                for w, v in sorted(d.items(), key=lambda kv: statistics.fmean(kv[1]))} for k, d in ways.items()}


def main():
    from rad_ds.core.provenance import render_only

    if render_only(render, ROOT / "benchmarks" / "results" / "placement_validation_cpu.json"):
        return
    args = _parser().parse_args()

    from rad_ds.core.provenance import provenance
    from rad_ds.data.config import DataConfig
    from rad_ds.models.conversion import load_model
    from rad_ds.study.heldout import HeldOut, scored_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tok = load_model(args.model, dtype=torch.float32)
    teacher.eval()
    data = DataConfig()
    data.seq_len = args.seq_len
    ref = HeldOut(teacher, tok, scored_rows(data, args.validation, tok, args.rows), [], 0)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"placement_validation_{dev}.json")
    # scores of the same placements on the same positions: not recomputed
    scored = _earlier_scores(out, args.validation, ref.positions) if args.reuse else {}
    rows = _score_placements(candidates(args), teacher, ref, scored)
    res = {"provenance": provenance(), "device": dev, "model": args.model, "split": "validation",
           "validation": args.validation, "positions": ref.positions, "init": "attention_skip",
           "placements": rows, "summary": _by_way(rows), "seconds": time.perf_counter() - t0}
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(res))
    print(render(res))


def render(res: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    md = [f"# Choosing the diagnosis' defaults on the validation split ({res['model']})", "",
          f"Initial student ({res['init']}: the skip-draft of its layers) KL to the full model on {res['positions']} "
          f"positions of `{res['validation']}` (the validation split: never trained on, never reported as a result), "
          "per way of choosing the layers: the mean over its choices (two halves of the training data, budgets), "
          "lowest first.", ""]
    for k, d in sorted(res["summary"].items(), key=lambda kv: int(kv[0])):
        md += [f"## k = {k}", "", "| way of choosing | mean validation KL | choices | range |", "|---|---:|---:|---|"]
        for w, s in d.items():
            md.append(f"| {w} | {s['mean']:.4f} | {s['n']} | {s['min']:.4f}-{s['max']:.4f} |")
        md.append("")
    md += ["Every placement:", "", "| k | layers | way | from | validation KL | top-1 agr. |",
           "|---|---|---|---|---:|---:|"]
    for r in sorted(res["placements"], key=lambda r: (r["k"], r["validation_kl"])):
        md.append(f"| {r['k']} | {r['layers']} | {r['way']} | {r['source']} | {r['validation_kl']:.4f} | "
                  f"{r['validation_top1']:.3f} |")
    md += ["", f"{res['seconds']:.0f} s in all.", "", provenance_line(res["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
