"""The greedy acceptance estimator against the real self-speculative decoder on SmolLM2-135M-Instruct (30
attention layers): time per evaluated skip mask on the same masks and prompts, and a check that their greedy
acceptance statistics (accepted and drafted counts, the per-round trace) are identical (``--signal greedy`` of
the diagnosis; its default signal, expected acceptance on documents, has no decoder to equal). The default
diagnosis' own cost and stability are ``benchmarks/diagnosis_stability.py``'s.

Results go to ``benchmarks/results/diagnosis_<device>.json`` and ``.md``.

    python benchmarks/diagnosis.py                          # 4 prompts x 48 tokens, 4 masks (~1.5 min on 2 cores)
    python benchmarks/diagnosis.py --prompts 2 --max-new-tokens 32 --masks 2
"""

from __future__ import annotations

import argparse
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


def render(res: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    e = res["estimator"]
    md = [f"# Greedy acceptance estimator vs the real decoder ({res['device']}, {res['threads']} threads, "
          f"{res['model']})", "",
          f"{e['prompts']} prompts x {e['max_new_tokens']} new tokens, draft length {e['draft_len']} (estimator "
          f"setup, once: {e['estimator_setup_s']:.1f} s); `identical`: the estimator's accepted and drafted counts "
          "and its per-round trace equal the real self-speculative decoder's.", "",
          "| mask | estimator (s) | real decoder (s) | ratio | acceptance | identical |",
          "|---|---:|---:|---:|---:|---|"]
    md += [f"| {r['mask']} | {r['estimator_s']:.2f} | {r['real_decoder_s']:.2f} | {r['ratio']:.1f}x | "
           f"{r['acceptance_rate']:.3f} | {r['identical']} |" for r in e["masks"]]
    md += ["", f"Overall: **{e['overall_ratio']:.1f}x** faster per mask; identical statistics: {e['all_identical']}.",
           "", provenance_line(res["provenance"])]
    return "\n".join(md) + "\n"


def main():
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "diagnosis_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/diagnosis_<device>.json)")
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    args = ap.parse_args()

    from rad_ds.models.conversion import load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"provenance": provenance(), "device": dev, "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "model": args.model}
    model, tok = load_model(args.model, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.to(dev).eval()
    res["estimator"] = bench_estimator(model, tok, args.prompts, args.max_new_tokens, args.draft_len,
                                       args.masks, args.seed)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"diagnosis_{dev}.json")
    print(write_results(out, res, render).read_text())


if __name__ == "__main__":
    main()
