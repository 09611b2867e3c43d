"""Does the diagnosis generalise? The selection of SmolLM2-135M-Instruct made on two disjoint prompt sets
(A and B: the built-in math + code mix, alternate pairs of one pool, so both halves keep the mix) per prompt
budget n, their overlap (Jaccard) at each k, and what each budget costs; plus each half's selection scored on
the other half's prompts (held out) against the half's own baselines.

The selection is the stage's own procedure (``rad_ds.diagnosis.search.select``: single-skip scores, greedy
build-up if asked, TPE, swap search) with the default, timing-independent objective (the weights cost model).
To fit a 2-core CPU the budgets share work: every (prompt, mask) is scored once (``AcceptanceEstimator`` on
that prompt alone, exact) and a half's budget-n set is the first n prompts of that half, so smaller budgets
reuse the larger ones' scores. The reported cost of a budget is what one diagnosis on n prompts would spend
on this machine: the greedy continuations of its prompts plus every mask it scored on each of its prompts
(each timed when first computed) plus the search's own overhead; the benchmark's wall time is less.

    python benchmarks/diagnosis_stability.py              # budgets 4,8,16, k 2,4: diagnosis_stability_cpu.md
    python benchmarks/diagnosis_stability.py --budgets 4,8,16,32 --trials 0 --swap-evals 0 \
        --out benchmarks/results/diagnosis_stability_single_skip_cpu.json     # single-skip top-k alone

Writes ``benchmarks/results/diagnosis_stability_<device>.json`` and ``.md``; per-(prompt, mask) scores are
kept in ``runs/diagnosis_stability_cache.pt`` so that a rerun with other budgets only scores what is new.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PromptPool:
    """Per-prompt acceptance totals of masks, each (prompt, mask) scored once and timed."""

    def __init__(self, model, prompts, max_new_tokens: int, draft_len: int, eos, cache_path: Path, key: str):
        self.model, self.prompts, self.eos = model, prompts, eos
        self.max_new, self.draft_len = max_new_tokens, draft_len
        self.keys = [hashlib.sha1(f"{key}|{p.tolist()}".encode()).hexdigest()[:16] for p in prompts]
        self.cache_path = cache_path
        self.memo, self.setup_s = {}, {}
        if cache_path.is_file():
            saved = torch.load(cache_path)
            self.memo, self.setup_s = saved["memo"], saved["setup_s"]
        self.est = {}
        self.new_evals, self.new_seconds = 0, 0.0

    def save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        torch.save({"memo": self.memo, "setup_s": self.setup_s}, tmp)
        tmp.replace(self.cache_path)

    def _estimator(self, s: int):
        from rad_ds.diagnosis.acceptance import AcceptanceEstimator

        if s not in self.est:
            t0 = time.perf_counter()
            self.est[s] = AcceptanceEstimator(self.model, [self.prompts[s]], self.max_new, self.draft_len,
                                              eos_token_id=self.eos)
            self.setup_s.setdefault(self.keys[s], time.perf_counter() - t0)
        return self.est[s]

    def stats(self, s: int, mask: frozenset):
        from rad_ds.diagnosis.acceptance import AcceptanceStats

        key = (self.keys[s], tuple(sorted(mask)))
        if key not in self.memo:
            est = self._estimator(s)
            t0 = time.perf_counter()
            st = est.stats(mask)
            dt = time.perf_counter() - t0
            self.memo[key] = (st.accepted, st.drafted, st.rounds, st.tokens, dt)
            self.new_evals += 1
            self.new_seconds += dt
            if self.new_evals % 200 == 0:
                self.save()
        a, d, r, t, _ = self.memo[key]
        return AcceptanceStats(a, d, r, t)

    def evaluator(self, idx: list[int], objective_fn):
        from rad_ds.diagnosis.acceptance import AcceptanceStats
        from rad_ds.diagnosis.search import MaskEvaluator

        def stats_fn(mask):
            total = AcceptanceStats()
            for s in idx:
                total = total + self.stats(s, mask)
            return total

        return MaskEvaluator(stats_fn, objective_fn)

    def cost(self, idx: list[int], masks) -> float:
        """Seconds one diagnosis on prompts ``idx`` would spend: continuations + every mask on every prompt."""
        setup = sum(self.setup_s[self.keys[s]] for s in idx)
        return setup + sum(self.memo[(self.keys[s], tuple(sorted(m)))][4] for m in masks for s in idx)


def run_selection(pool: PromptPool, idx, cands, ks, objective_fn, args) -> dict:
    from rad_ds.diagnosis.search import select
    from rad_ds.diagnosis.stability import single_skip_stability

    ev = pool.evaluator(idx, objective_fn)
    seconds_before, t0 = pool.new_seconds, time.perf_counter()
    single, results = select(ev, cands, ks, args.trials, args.swap_evals, args.seed, args.greedy)
    overhead = (time.perf_counter() - t0) - (pool.new_seconds - seconds_before)  # TPE, bookkeeping
    per_prompt = {i: torch.tensor([list(pool.memo[(pool.keys[s], (i,))][:4]) for s in idx]) for i in cands}
    intervals, topk_freq = single_skip_stability(per_prompt, cands, ks, 1000, args.seed)
    out = {"n": len(idx), "masks": len(ev.cache), "cost_s": pool.cost(idx, ev.cache) + max(overhead, 0.0),
           "redundancy": {i: single[i].stats.acceptance_rate for i in cands},
           "redundancy_ci": {i: list(intervals[i]) for i in cands}, "k": {}}
    for k, r in results.items():
        out["k"][k] = {"layers": r.best.layers, "method": r.best.method, "objective": r.best.objective,
                       "acceptance_rate": r.best.stats.acceptance_rate,
                       "baselines": {m: {"layers": s.layers, "objective": s.objective,
                                         "acceptance_rate": s.stats.acceptance_rate} for m, s in r.candidates.items()},
                       "gains": r.gains(), "swap": r.swap,
                       "single_skip_topk_frequency": {i: f for i, f in topk_freq[k].items() if f > 0}}
    return out


def held_out_scores(pool: PromptPool, sel: dict, other_idx, objective_fn) -> dict:
    """A half's selection and baselines per k, scored on the other half's prompts."""
    ev = pool.evaluator(other_idx, objective_fn)
    out = {}
    for k, r in sel["k"].items():
        row = {"selection": ev(frozenset(r["layers"])).stats.acceptance_rate}
        for m, b in r["baselines"].items():
            row[m] = ev(frozenset(b["layers"])).stats.acceptance_rate
        out[k] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--budgets", default="4,8,16", help="prompts per half, ascending")
    ap.add_argument("--k", default="2,4")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--trials", type=int, default=6, help="TPE trials per k")
    ap.add_argument("--swap-evals", type=int, default=16, help="swap-search budget per k")
    ap.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=False, help="greedy build-up baseline")
    ap.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                    help="score each half's selection on the other half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core CPU, 2 OpenMP threads ran 5-10x slower here)")
    ap.add_argument("--max-minutes", type=float, default=25.0, help="start no further budget after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rad_ds.decoding.eos import model_eos_ids
    from rad_ds.decoding.prompts import default_prompts, encode
    from rad_ds.decoding.skipping import candidate_layers
    from rad_ds.diagnosis.cost import weights_cost_model
    from rad_ds.diagnosis.stability import jaccard
    from rad_ds.models.conversion import load_model

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    ks = sorted(int(k) for k in args.k.split(","))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=torch.float32)
    model.to(dev).eval()
    eos = sorted(model_eos_ids(tok, model))
    rows = default_prompts(2 * budgets[-1], args.seed)
    prompts = [encode(tok, kind, value, True) for kind, value in rows]
    # alternate pairs (math, code) of the pool: A = 0,1,4,5,..., B = 2,3,6,7,...; both keep the mix
    halves = {"A": [i for i in range(len(prompts)) if i % 4 < 2], "B": [i for i in range(len(prompts)) if i % 4 >= 2]}
    cost_model = weights_cost_model(model)
    cands = candidate_layers(model.config)

    def objective(mask, st):
        return cost_model.estimated_speedup(len(mask), st.accepted, st.drafted, st.rounds, st.tokens)

    key = f"{args.model}|{args.max_new_tokens}|{args.draft_len}|{dev}|{args.threads}"
    pool = PromptPool(model, prompts, args.max_new_tokens, args.draft_len, eos,
                      ROOT / "runs" / "diagnosis_stability_cache.pt", key)
    res = {"device": dev, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "model": args.model, "settings": {"budgets": budgets, "k": ks, "max_new_tokens": args.max_new_tokens,
                                             "draft_len": args.draft_len, "trials_per_k": args.trials,
                                             "swap_evals_per_k": args.swap_evals, "greedy_baseline": args.greedy,
                                             "objective": "estimated speed-up, weights cost model", "seed": args.seed},
           "prompt_tokens": {h: [int(prompts[i].numel()) for i in idx] for h, idx in halves.items()}, "budgets": []}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"diagnosis_stability_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in budgets:  # the total work does not depend on the order; ascending gives results early
        if res["budgets"] and time.perf_counter() - t_start > 60 * args.max_minutes:
            log(f"stopping before n={n}: over --max-minutes {args.max_minutes}")
            res["skipped_budgets"] = [b for b in budgets if b >= n]
            break
        row = {"n": n}
        for h, idx in halves.items():
            t0 = time.perf_counter()
            row[h] = run_selection(pool, idx[:n], cands, ks, objective, args)
            log(f"n={n} half {h}: " + ", ".join(f"k={k} {row[h]['k'][k]['layers']} ({row[h]['k'][k]['method']})"
                                                for k in ks) + f"  [{time.perf_counter() - t0:.0f} s here, "
                                                f"cost {row[h]['cost_s']:.0f} s]")
            pool.save()
        row["jaccard"] = {k: jaccard(row["A"]["k"][k]["layers"], row["B"]["k"][k]["layers"]) for k in ks}
        row["jaccard_baselines"] = {m: {k: jaccard(row["A"]["k"][k]["baselines"][m]["layers"],
                                                   row["B"]["k"][k]["baselines"][m]["layers"]) for k in ks}
                                    for m in row["A"]["k"][ks[0]]["baselines"]}
        if args.held_out:
            row["held_out"] = {"A_on_B": held_out_scores(pool, row["A"], halves["B"][:n], objective),
                               "B_on_A": held_out_scores(pool, row["B"], halves["A"][:n], objective)}
            pool.save()
        row["cost_s"] = (row["A"]["cost_s"] + row["B"]["cost_s"]) / 2
        log(f"n={n}: jaccard {row['jaccard']}  (single-skip top-k {row['jaccard_baselines']['single_skip_topk']})")
        res["budgets"].append(row)
        res["wall_s"] = time.perf_counter() - t_start
        res["scored_here"] = {"evaluations": pool.new_evals, "seconds": pool.new_seconds}
        target = [r["n"] for r in res["budgets"] if r["jaccard"].get(4, 0.0) >= 0.6]
        res["smallest_budget_jaccard_k4_ge_0.6"] = min(target) if target else None
        out.write_text(json.dumps(res, indent=2) + "\n")  # after every budget: a stopped run keeps its results
        out.with_suffix(".md").write_text(markdown(res) + "\n")
    print(markdown(res))
    print(f"results: {out}")


def markdown(res: dict) -> str:
    s, ks = res["settings"], res["settings"]["k"]
    procedure = (f"single-skip scores, {'greedy build-up, ' if s['greedy_baseline'] else ''}TPE {s['trials_per_k']} "
                 f"trials per k, swap search {s['swap_evals_per_k']} evaluations per k")
    md = [f"# Diagnosis stability ({res['device']}, {res['threads']} threads, {res['model']})", "",
          f"Selection on two disjoint prompt sets A and B (the built-in math + code mix) per budget n; "
          f"{procedure}; objective: {s['objective']}; {s['max_new_tokens']} new tokens, draft length "
          f"{s['draft_len']}, seed {s['seed']}. Cost: seconds one diagnosis on n prompts spends on this machine "
          f"(mean of A and B). Wall time of the whole benchmark {res['wall_s'] / 60:.1f} min.", "",
          "| n | " + " | ".join(f"k={k} A | k={k} B | Jaccard k={k} (single-skip top-k)" for k in ks)
          + " | masks scored (A/B) | cost (s) |",
          "|---" * (3 * len(ks) + 3) + "|"]
    for r in res["budgets"]:
        cells = []
        for k in ks:
            a, b = r["A"]["k"][k], r["B"]["k"][k]
            cells += [f"{a['layers']} {a['method']}", f"{b['layers']} {b['method']}",
                      f"**{r['jaccard'][k]:.2f}** ({r['jaccard_baselines']['single_skip_topk'][k]:.2f})"]
        masks = f"{r['A']['masks']}/{r['B']['masks']}"
        md.append(f"| {r['n']} | " + " | ".join(cells) + f" | {masks} | {r['cost_s']:.0f} |")
    best = res["smallest_budget_jaccard_k4_ge_0.6"]
    md += ["", "Smallest budget with Jaccard >= 0.6 at k=4: " + (f"**{best} prompts**." if best else
           f"**none of {[r['n'] for r in res['budgets']]}**.")
           + (f" Budgets {res['skipped_budgets']} not run (time limit)." if res.get("skipped_budgets") else ""), ""]
    if any("held_out" in r for r in res["budgets"]):
        md += ["Held out: each half's choice scored on the other half's n prompts (acceptance rate), against the "
               "same half's baselines:", "",
               "| n | k | A's selection on B | A's single-skip top-k on B | B's selection on A | "
               "B's single-skip top-k on A |", "|---|---|---|---|---|---|"]
        for r in res["budgets"]:
            if "held_out" not in r:
                continue
            for k in ks:
                ab, ba = r["held_out"]["A_on_B"][k], r["held_out"]["B_on_A"][k]
                md.append(f"| {r['n']} | {k} | {ab['selection']:.3f} | {ab['single_skip_topk']:.3f} | "
                          f"{ba['selection']:.3f} | {ba['single_skip_topk']:.3f} |")
        md.append("")
    md += ["Gains of the search over its baselines on its own prompts (objective; acceptance rate):", "",
           "| n | half | k | vs single-skip top-k | vs TPE | vs greedy | swap moves / evaluations |",
           "|---|---|---|---|---|---|---|"]
    for r in res["budgets"]:
        for h in ("A", "B"):
            for k in ks:
                g, sw = r[h]["k"][k]["gains"], r[h]["k"][k]["swap"]

                def cell(m, g=g):
                    return f"{g[m]['objective']:+.3f}; {g[m]['acceptance_rate']:+.3f}" if m in g else "-"

                md.append(f"| {r['n']} | {h} | {k} | {cell('single_skip_topk')} | {cell('bo')} | "
                          f"{cell('greedy')} | {len(sw['moves'])} / {sw['evaluations']} |")
    return "\n".join(md)


if __name__ == "__main__":
    main()
