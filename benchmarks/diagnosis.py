"""Diagnosis speed on SmolLM2-135M-Instruct (30 attention layers), two measurements in one run:

1. ``estimator``: time per evaluated skip mask, the fast acceptance estimator against the real
   self-speculative decoder, on the same masks and prompts, checking that their greedy acceptance
   statistics are identical (target: >= 20x faster).
2. ``search``: a k-sweep search (>= 200 trials) through ``diagnose`` with its real-decoder re-check of the
   best masks: wall time (target: under 10 minutes on a 2-core CPU) and the best masks' real speed-ups.

Results go to ``benchmarks/results/diagnosis_<device>.json`` and ``.md``.

    python benchmarks/diagnosis.py                      # both parts
    python benchmarks/diagnosis.py --part estimator --masks 4
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_estimator(model, tok, n_prompts, max_new, draft_len, n_masks, seed):
    from rad_ds.decoding.prompts import load_prompts
    from rad_ds.diagnosis import AcceptanceEstimator, SelfSpeculativeDecoder, SpecConfig, candidate_layers

    prompts = load_prompts(tok, None, n_prompts, seed, True, max_new, model.config.max_position_embeddings)
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    est = AcceptanceEstimator(model, prompts, max_new, draft_len, eos_token_id=eos)
    setup_s = time.perf_counter() - t0
    cands = candidate_layers(model.config)
    rng = random.Random(seed)
    masks = [frozenset(rng.sample(cands, k)) for k in [2, 4, 8, 4, 2, 8][:n_masks]]
    rows = []
    for mask in masks:
        t0 = time.perf_counter()
        st = est.stats(mask)
        t_est = time.perf_counter() - t0
        dec = SelfSpeculativeDecoder(model, mask, SpecConfig(draft_len=draft_len, max_new_tokens=max_new,
                                                            eos_token_id=eos))
        t0 = time.perf_counter()
        real = [dec.generate(p) for p in prompts]
        t_real = time.perf_counter() - t0
        same = (st.accepted == sum(sum(r.accepted) for r in real) and st.drafted == sum(sum(r.drafted) for r in real)
                and est.trace(mask) == [r.accepted for r in real])
        rows.append({"mask": sorted(mask), "estimator_s": t_est, "real_decoder_s": t_real,
                     "ratio": t_real / t_est, "acceptance_rate": st.acceptance_rate, "identical": same})
        print(f"mask {sorted(mask)}: estimator {t_est:.2f}s  real decoder {t_real:.2f}s  "
              f"ratio {t_real / t_est:.1f}x  acceptance {st.acceptance_rate:.3f}  identical={same}", flush=True)
    ratio = sum(r["real_decoder_s"] for r in rows) / sum(r["estimator_s"] for r in rows)
    return {"prompts": n_prompts, "max_new_tokens": max_new, "draft_len": draft_len,
            "estimator_setup_s": setup_s, "masks": rows, "overall_ratio": ratio,
            "all_identical": all(r["identical"] for r in rows)}


def bench_search(model_name, out, ks, trials, n_prompts, max_new, seed):
    from rad_ds.diagnosis.runner import DiagnoseConfig, diagnose

    t0 = time.perf_counter()
    rep = diagnose(DiagnoseConfig(model=model_name, out=str(out), k=ks, trials=trials, num_prompts=n_prompts,
                                  max_new_tokens=max_new, seed=seed, recheck_prompts=n_prompts))
    wall = time.perf_counter() - t0
    return {"k": ks, "trials_total": len(rep["trials"]), "single_skip_evals": sum(
        1 for d in rep["layers"] if d["type"] == "attention"), "evaluated_masks": rep["evaluated_masks"],
        "wall_s": wall, "seconds_breakdown": rep["seconds_breakdown"], "report": str(out / "report.json"),
        "selections": [{k: s.get(k) for k in ("k", "layers", "method", "acceptance_rate", "mean_accepted_length",
                                               "estimated_speedup", "measured_speedup", "estimator_exact")}
                       for s in rep["selections"]],
        "cost_model": rep["cost_model"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--part", choices=["estimator", "search", "all"], default="all")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--k", default="2,4,8")
    ap.add_argument("--trials", type=int, default=70, help="BO trials per k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rad_ds.models.conversion import load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "model": args.model}
    if args.part in ("estimator", "all"):
        model, tok = load_model(args.model, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        model.to(dev).eval()
        res["estimator"] = bench_estimator(model, tok, args.prompts, args.max_new_tokens, args.draft_len,
                                           args.masks, args.seed)
        del model
    if args.part in ("search", "all"):
        res["search"] = bench_search(args.model, ROOT / "runs" / "bench_diagnosis", [int(k) for k in args.k.split(",")],
                                     args.trials, args.prompts, args.max_new_tokens, args.seed)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"diagnosis_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Diagnosis benchmark ({dev}, {res['threads']} threads, {args.model})", ""]
    if "estimator" in res:
        e = res["estimator"]
        md += [f"Estimator vs real decoder, {e['prompts']} prompts x {e['max_new_tokens']} new tokens, "
               f"draft length {e['draft_len']} (estimator setup, once: {e['estimator_setup_s']:.1f} s):", "",
               "| mask | estimator (s) | real decoder (s) | ratio | acceptance | identical |", "|---|---|---|---|---|---|"]
        md += [f"| {r['mask']} | {r['estimator_s']:.2f} | {r['real_decoder_s']:.2f} | {r['ratio']:.1f}x | "
               f"{r['acceptance_rate']:.3f} | {r['identical']} |" for r in e["masks"]]
        md += ["", f"Overall: **{e['overall_ratio']:.1f}x** faster per mask; identical statistics: {e['all_identical']}.", ""]
    if "search" in res:
        s = res["search"]
        md += [f"k-sweep search: k={s['k']}, {s['trials_total']} BO trials + {s['single_skip_evals']} single-skip "
               f"evaluations ({s['evaluated_masks']} distinct masks): search **{s['seconds_breakdown']['search'] / 60:.1f} min**"
               f" (setup {s['seconds_breakdown']['setup'] / 60:.1f} min: model, prompts, greedy continuations, cost "
               f"model; real-decoder re-check of the best masks {s['seconds_breakdown']['recheck'] / 60:.1f} min; "
               f"total {s['wall_s'] / 60:.1f} min).", "",
               "| k | layers | method | acceptance | est. speed-up | measured speed-up |", "|---|---|---|---|---|---|"]
        md += [f"| {x['k']} | {x['layers']} | {x['method']} | {x['acceptance_rate']:.3f} | "
               f"{x['estimated_speedup']:.2f}x | {x['measured_speedup']:.2f}x |" for x in s["selections"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
