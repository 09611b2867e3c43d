"""Does the diagnosis' choice depend on which documents it reads? The selection of SmolLM2-135M-Instruct made on two
disjoint halves of the training data (documents shuffled with the seed, then alternated into A and B) per position
budget, their overlap (Jaccard) at each k, what each budget costs, and each half's choice scored on the other half.

The selection is the stage's own procedure (``rad_ds.diagnosis.search.select``: single-skip scores, TPE, swap
search; the defaults of ``DiagnoseConfig``) with the default objective (weights cost model) on the stage's own
document windows (``rad_ds.diagnosis.documents``). Several signals are scored from the same forward passes
(``--signals expected,greedy``: the new default and the former one, on the same positions). To fit a 2-core CPU
the budgets share work: every (window, mask) is scored once, and a half's budget-B set is that half's first
windows up to B positions, so smaller budgets reuse the larger ones' scores. The reported cost of a budget is what
one diagnosis at that budget spends on this machine: the full model's pass over its windows plus every mask it
scored (each timed when first computed) plus the search's own overhead; the benchmark's wall time is less.

    python launchers/corpus.py --config configs/corpus_smollm2.yaml --out runs/corpus-smollm2
    python benchmarks/diagnosis_stability.py --data runs/corpus-smollm2/train/chat.jsonl    # -> *_cpu.json / .md

Writes ``benchmarks/results/diagnosis_stability_<device>.json`` and ``.md`` (``default``: the row of the default
budget, ``DiagnoseConfig.tokens``); per-(window, mask) scores are kept in ``runs/diagnosis_stability_cache.pt`` so
that a rerun with other budgets only scores what is new.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class WindowPool:
    """Per-window totals of masks under each signal, each (window, mask) scored once (one draft forward for all
    signals) and timed."""

    def __init__(self, model, windows, signals: list[str], draft_len: int, temperature: float, cache_path: Path,
                 key: str):
        from rad_ds.diagnosis.acceptance import AcceptanceEstimator

        self.windows, self.signals, self.cache_path = windows, signals, cache_path
        self.keys = [hashlib.sha1(f"{key}|{ids.tolist()}|{c.tolist()}".encode()).hexdigest()[:16] for ids, c in windows]
        self.memo, self.setup_s = {}, {}
        if cache_path.is_file():
            saved = torch.load(cache_path)
            self.memo, self.setup_s = saved["memo"], saved["setup_s"]
        self.model, self.draft_len, self.temperature = model, draft_len, temperature
        self.est: dict[int, dict] = {}
        self.new_evals, self.new_seconds = 0, 0.0
        self._est_cls = AcceptanceEstimator

    def save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        torch.save({"memo": self.memo, "setup_s": self.setup_s}, tmp)
        tmp.replace(self.cache_path)

    def _estimator(self, w: int):
        """The window's estimator and, per signal, (signal, the full model's side) from one full forward."""
        from rad_ds.diagnosis.signals import make_signal

        if w not in self.est:
            t0 = time.perf_counter()
            est = self._est_cls(self.model, documents=[self.windows[w]], draft_len=self.draft_len,
                                signal=self.signals[0], temperature=self.temperature)
            full = est.runner.full_logits(0, index=est.seqs[0].index)
            sides = {}
            for name in self.signals:
                sig = make_signal(name, self.temperature)
                sides[name] = (sig, sig.prepare(full, None))
            self.est[w] = (est, sides)
            self.setup_s.setdefault(self.keys[w], time.perf_counter() - t0)
        return self.est[w]

    def stats(self, w: int, mask: frozenset, signal: str):
        from rad_ds.diagnosis.acceptance import AcceptanceStats

        key = (self.keys[w], tuple(sorted(mask)))
        if key not in self.memo:
            est, sides = self._estimator(w)
            t0 = time.perf_counter()
            logits = est.runner.logits(0, frozenset(mask), index=est.seqs[0].index)  # one draft forward for all
            row = {}
            for name, (sig, ref) in sides.items():
                t = sig.totals(sig.score(ref, logits), self.draft_len)
                row[name] = (t.accepted, t.drafted, t.rounds, t.tokens, t.alpha, t.positions)
            dt = time.perf_counter() - t0
            self.memo[key] = (row, dt)
            self.new_evals += 1
            self.new_seconds += dt
            if self.new_evals % 200 == 0:
                self.save()
        return AcceptanceStats(*self.memo[key][0][signal])

    def evaluator(self, idx: list[int], objective_fn, signal: str):
        from rad_ds.diagnosis.acceptance import AcceptanceStats
        from rad_ds.diagnosis.search import MaskEvaluator

        def stats_fn(mask):
            total = AcceptanceStats()
            for w in idx:
                total = total + self.stats(w, mask, signal)
            return total

        return MaskEvaluator(stats_fn, objective_fn)

    def cost(self, idx: list[int], masks) -> float:
        """Seconds one diagnosis on windows ``idx`` would spend: the full model's pass + every mask on every window."""
        setup = sum(self.setup_s[self.keys[w]] for w in idx)
        return setup + sum(self.memo[(self.keys[w], tuple(sorted(m)))][1] for m in masks for w in idx)


def run_selection(pool: WindowPool, idx, cands, ks, objective_fn, signal: str, args) -> dict:
    from rad_ds.diagnosis.search import select

    ev = pool.evaluator(idx, objective_fn, signal)
    seconds_before, t0 = pool.new_seconds, time.perf_counter()
    single, results = select(ev, cands, ks, args.trials, args.swap_evals, args.seed, False)
    overhead = (time.perf_counter() - t0) - (pool.new_seconds - seconds_before)  # TPE, bookkeeping
    out = {"windows": len(idx), "positions": _positions(pool.windows, idx),
           "masks": len(ev.cache), "cost_s": pool.cost(idx, ev.cache) + max(overhead, 0.0),
           "redundancy": {i: single[i].stats.acceptance_rate for i in cands}, "k": {}}
    for k, r in results.items():
        out["k"][k] = {"layers": r.best.layers, "method": r.best.method, "objective": r.best.objective,
                       "acceptance_rate": r.best.stats.acceptance_rate, "mean_alpha": r.best.stats.mean_alpha,
                       "baselines": {m: {"layers": s.layers, "objective": s.objective,
                                         "acceptance_rate": s.stats.acceptance_rate} for m, s in r.candidates.items()},
                       "swap": r.swap}
    return out


def _single_skip_only(pool: WindowPool, halves, first, budget: int, cands, ks, signal: str) -> dict:
    """Single-skip scores of ``signal`` on each half (read from the memo the default signal's search filled) and the
    Jaccard of the halves' top-k."""
    from rad_ds.decoding.skipping import topk_mask
    from rad_ds.diagnosis.acceptance import AcceptanceStats
    from rad_ds.diagnosis.stability import jaccard

    out = {}
    for h, idx in halves.items():
        sel = first(idx, budget)
        rates = {}
        for i in cands:
            total = AcceptanceStats()
            for w in sel:
                total = total + pool.stats(w, frozenset({i}), signal)
            rates[i] = total.acceptance_rate
        out[h] = {"redundancy": rates, "k": {k: sorted(topk_mask(rates, cands, k)) for k in ks}}
    out["jaccard"] = {str(k): jaccard(out["A"]["k"][k], out["B"]["k"][k]) for k in ks}
    return out


def held_out_scores(pool: WindowPool, sel: dict, other_idx, objective_fn, signal: str) -> dict:
    """A half's selection and baselines per k, scored on the other half's windows (objective)."""
    ev = pool.evaluator(other_idx, objective_fn, signal)
    out = {}
    for k, r in sel["k"].items():
        out[k] = {"selection": ev(frozenset(r["layers"])).objective,
                  **{m: ev(frozenset(b["layers"])).objective for m, b in r["baselines"].items()}}
    return out


def _parser(d) -> argparse.ArgumentParser:
    """The command line; the selection's settings default to the stage's own (``DiagnoseConfig`` ``d``)."""
    from rad_ds.core.provenance import RENDER_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--data", required=True, help="the training data (its documents are split into halves A and B)")
    ap.add_argument("--budgets", default=f"1024,2048,{d.tokens}", help="counted positions per half, ascending")
    ap.add_argument("--k", default="2,4,8")
    ap.add_argument("--signals", default="expected,greedy", help="signals scored from the same forwards: the first "
                                                                  "runs the whole search, the others their single-skip "
                                                                  "top-k (free: the same masks)")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--draft-len", type=int, default=d.draft_len)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--trials", type=int, default=d.trials, help="TPE trials per k")
    ap.add_argument("--swap-evals", type=int, default=d.swap_evals, help="swap-search budget per k")
    ap.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                    help="score each half's selection on the other half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timed-report", default=None,
                    help="report.json of a default diagnosis (k = 2, 4, 8) run alone on this machine: its seconds "
                         "become default.seconds (the benchmark's own costs are measured beside other work)")
    ap.add_argument("--render-only", action="store_true", help="re-read --out, apply --timed-report, re-render the .md")
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    ap.add_argument("--out", default=None)
    return ap


def _rerender(args) -> None:
    """``--render-only``: re-read --out, apply --timed-report, rewrite the JSON and its .md."""
    out = Path(args.out or ROOT / "benchmarks" / "results" / "diagnosis_stability_cpu.json")
    res = json.loads(out.read_text())
    _summarise(res, res["settings"]["signals"][0], args.timed_report)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(res))


def _split_halves(docs, seq_len: int, cap: int, rng) -> tuple[list, dict]:
    """The documents in ``rng``'s shuffled order, one window each (as the stage takes them), alternated into halves A
    and B until both hold ``cap`` counted positions: (windows, {"A": window indices, "B": window indices})."""
    from rad_ds.diagnosis.documents import window

    order = list(range(len(docs)))
    rng.shuffle(order)
    windows, halves = [], {"A": [], "B": []}
    got = {"A": 0, "B": 0}
    for j in order:
        w = window(*docs[j], seq_len, rng)
        n = int(w[1].sum())
        if n == 0:
            continue
        h = "A" if got["A"] <= got["B"] else "B"
        if got[h] >= cap:
            h = "B" if h == "A" else "A"
            if got[h] >= cap:
                break
        halves[h].append(len(windows))
        windows.append(w)
        got[h] += n
    return windows, halves


def _positions(windows, idx) -> int:
    """Counted positions of windows ``idx`` (the last position predicts nothing)."""
    return int(sum(int(windows[w][1][:-1].sum()) for w in idx))


def _first_windows(windows, idx, budget: int) -> list[int]:
    """A half's first windows up to ``budget`` counted positions: a smaller budget reuses a larger one's scores."""
    out, n = [], 0
    for w in idx:
        if n >= budget:
            break
        out.append(w)
        n += int(windows[w][1][:-1].sum())
    return out


def _search_signal(pool: WindowPool, halves, first, budget: int, cands, ks, objective, sig: str, args) -> dict:
    """``sig``'s whole search on each half at ``budget``: the choices, their Jaccard (and that of the single-skip
    top-k), each half's choice scored on the other half (``--held-out``) and the mean cost of one diagnosis."""
    from rad_ds.diagnosis.stability import jaccard

    r = {}
    for h, idx in halves.items():
        t0 = time.perf_counter()
        r[h] = run_selection(pool, first(idx, budget), cands, ks, objective, sig, args)
        log(f"budget {budget} {sig} half {h}: " + ", ".join(f"k={k} {r[h]['k'][k]['layers']}" for k in ks)
            + f"  [{time.perf_counter() - t0:.0f} s here, cost {r[h]['cost_s']:.0f} s]")
        pool.save()
    r["jaccard"] = {str(k): jaccard(r["A"]["k"][k]["layers"], r["B"]["k"][k]["layers"]) for k in ks}
    r["jaccard_single_skip_topk"] = {
        str(k): jaccard(r["A"]["k"][k]["baselines"]["single_skip_topk"]["layers"],
                        r["B"]["k"][k]["baselines"]["single_skip_topk"]["layers"]) for k in ks}
    if args.held_out:
        r["held_out"] = {"A_on_B": held_out_scores(pool, r["A"], first(halves["B"], budget), objective, sig),
                         "B_on_A": held_out_scores(pool, r["B"], first(halves["A"], budget), objective, sig)}
        pool.save()
    r["seconds"] = (r["A"]["cost_s"] + r["B"]["cost_s"]) / 2
    log(f"budget {budget} {sig}: jaccard {r['jaccard']} (single-skip top-k {r['jaccard_single_skip_topk']})")
    return r


def _budget_row(pool: WindowPool, halves, first, budget: int, cands, ks, objective, signals, args) -> dict:
    """One budget's results: the other signals' single-skip top-k from the same forwards (no search), then the first
    signal's whole search."""
    row = {"tokens": budget, "signals": {}}
    for sig in signals[1:]:
        row.setdefault("single_skip_only", {})[sig] = _single_skip_only(pool, halves, first, budget, cands, ks, sig)
        log(f"budget {budget} {sig} single-skip top-k: jaccard {row['single_skip_only'][sig]['jaccard']}")
    for sig in signals[:1]:
        row["signals"][sig] = _search_signal(pool, halves, first, budget, cands, ks, objective, sig, args)
    return row


def _results_head(args, d, dev: str, docs, windows, halves, budgets, ks, signals) -> dict:
    """The results' fixed part (provenance, settings, positions per half), with no budget run yet."""
    from rad_ds.core.provenance import provenance

    return {"provenance": provenance(), "device": dev, "threads": torch.get_num_threads(), "model": args.model,
            "data": args.data, "documents": len(docs),
            "settings": {"budgets": budgets, "k": ks, "signals": signals, "seq_len": args.seq_len,
                         "draft_len": args.draft_len, "temperature": args.temperature, "trials_per_k": args.trials,
                         "swap_evals_per_k": args.swap_evals, "objective": "estimated speed-up, weights cost model",
                         "seed": args.seed, "default_budget": d.tokens},
            "positions": {h: _positions(windows, idx) for h, idx in halves.items()},
            "budgets": []}


def main():
    from rad_ds.core.provenance import render_only
    from rad_ds.diagnosis.config import DiagnoseConfig

    if render_only(render, ROOT / "benchmarks" / "results" / "diagnosis_stability_cpu.json"):
        return
    d = DiagnoseConfig()
    args = _parser(d).parse_args()
    if args.render_only:
        _rerender(args)
        return

    import functools
    import random

    from rad_ds.data.sources import load_records
    from rad_ds.data.tokenization import tokenize_records
    from rad_ds.decoding.skipping import candidate_layers
    from rad_ds.diagnosis.cost import weights_cost_model
    from rad_ds.models.conversion import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    ks = sorted(int(k) for k in args.k.split(","))
    signals = args.signals.split(",")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=torch.float32)
    model.to(dev).eval()
    docs = tokenize_records(load_records(args.data), tok, add_eos=True, mask_prompt=True, min_tokens=2, num_proc=1)
    windows, halves = _split_halves(docs, args.seq_len, budgets[-1], random.Random(args.seed))
    cost_model = weights_cost_model(model)
    cands = candidate_layers(model.config)

    def objective(mask, st):
        return cost_model.estimated_speedup(len(mask), st.accepted, st.drafted, st.rounds, st.tokens)

    key = f"{args.model}|{args.draft_len}|{args.temperature}|{dev}|{','.join(signals)}"
    pool = WindowPool(model, windows, signals, args.draft_len, args.temperature,
                      ROOT / "runs" / "diagnosis_stability_cache.pt", key)
    first = functools.partial(_first_windows, windows)
    res = _results_head(args, d, dev, docs, windows, halves, budgets, ks, signals)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"diagnosis_stability_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for b in budgets:  # ascending: results early
        res["budgets"].append(_budget_row(pool, halves, first, b, cands, ks, objective, signals, args))
        res["wall_s"] = time.perf_counter() - t_start
        res["scored_here"] = {"evaluations": pool.new_evals, "seconds": pool.new_seconds}
        _summarise(res, signals[0], args.timed_report)
        out.write_text(json.dumps(res, indent=2) + "\n")  # after every budget: a stopped run keeps its results
        out.with_suffix(".md").write_text(render(res))
    print(render(res))
    print(f"results: {out}")


def _summarise(res: dict, signal: str, timed_report: str | None = None) -> None:
    """``default``: the default signal at the default budget (or the largest run so far, named); with a timed
    report, its seconds (a default diagnosis run alone) are ``default.seconds``."""
    rows = {int(t): r for t, r in ((r["tokens"], r) for r in res["budgets"])}
    b = res["settings"]["default_budget"] if res["settings"]["default_budget"] in rows else max(rows)
    r = rows[b]["signals"][signal]
    res["default"] = {"tokens": b, "signal": signal, "jaccard": r["jaccard"], "seconds": r["seconds"],
                      "seconds_source": "this benchmark's cost of one diagnosis (measured beside other work)",
                      "jaccard_single_skip_topk": r["jaccard_single_skip_topk"]}
    if timed_report:
        rep = json.loads(Path(timed_report).read_text())
        res["default"].update(seconds=rep["seconds"], seconds_breakdown=rep.get("seconds_breakdown"),
                              seconds_source=f"a default diagnosis alone on this machine ({timed_report}: k "
                                             f"{rep['settings']['k']}, {rep['evaluated_masks']} masks, "
                                             f"{rep['settings'].get('world_size', 1)} process)",
                              timed_selections={str(x["k"]): x["layers"] for x in rep["selections"]})
    ok = [t for t, x in sorted(rows.items()) if x["signals"][signal]["jaccard"].get("4", 0.0) >= 0.6]
    res["smallest_budget_jaccard_k4_ge_0.6"] = ok[0] if ok else None


def _at(d: dict, k):
    """``d[k]`` for an int k, whether ``d`` was built here (int keys) or read back from JSON (string keys)."""
    return d[k] if k in d else d[str(k)]


def render(res: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    s, ks = res["settings"], res["settings"]["k"]
    md = [f"# Diagnosis stability ({res['device']}, {res['threads']} threads, {res['model']})", "",
          f"Selection on two disjoint halves A and B of `{res['data']}` ({res['documents']} documents, shuffled with "
          f"seed {s['seed']}, one window of up to {s['seq_len']} tokens each, alternated into A and B) per budget of "
          f"counted positions; single-skip scores, TPE {s['trials_per_k']} trials and a swap search of "
          f"{s['swap_evals_per_k']} evaluations per k; objective: {s['objective']}; draft length {s['draft_len']}, "
          f"temperature {s['temperature']}. Cost: seconds one diagnosis at that budget spends on this machine (mean "
          f"of A and B). Wall time of the whole benchmark {res['wall_s'] / 60:.1f} min.", "",
          "| positions | signal | " + " | ".join(f"k={k}: A / B | Jaccard k={k} (single-skip top-k)" for k in ks)
          + " | cost (s) |", "|---" * (2 * len(ks) + 3) + "|"]
    for r in res["budgets"]:
        for sig, x in r["signals"].items():
            cells = []
            for k in ks:
                a, b = _at(x["A"]["k"], k), _at(x["B"]["k"], k)
                cells += [f"{a['layers']} / {b['layers']}",
                          f"**{x['jaccard'][str(k)]:.2f}** ({x['jaccard_single_skip_topk'][str(k)]:.2f})"]
            md.append(f"| {r['tokens']} | {sig} | " + " | ".join(cells) + f" | {x['seconds']:.0f} |")
    for r in res["budgets"]:
        for sig, x in (r.get("single_skip_only") or {}).items():
            cells = []
            for k in ks:
                cells += [f"{_at(x['A']['k'], k)} / {_at(x['B']['k'], k)}",
                          f"({x['jaccard'][str(k)]:.2f}, single-skip top-k only)"]
            md.append(f"| {r['tokens']} | {sig} | " + " | ".join(cells) + " | - |")
    dflt = res["default"]
    best = res["smallest_budget_jaccard_k4_ge_0.6"]
    md += ["", f"Default ({dflt['signal']}, {dflt['tokens']} positions): Jaccard "
               + ", ".join(f"k={k} {v:.2f}" for k, v in dflt["jaccard"].items())
               + f"; one diagnosis at k = {', '.join(map(str, ks))} costs {dflt['seconds']:.0f} s "
               f"({dflt.get('seconds_source', 'here')}). "
               "Smallest budget "
               "with Jaccard >= 0.6 at k=4: " + (f"**{best} positions**." if best else "**none run**."), ""]
    if any("held_out" in x for r in res["budgets"] for x in r["signals"].values()):
        md += ["Held out: each half's choice scored on the other half's windows (estimated speed-up), against the "
               "same half's single-skip top-k:", "",
               "| positions | signal | k | A's choice on B | A's single-skip top-k on B | B's choice on A | "
               "B's single-skip top-k on A |", "|---|---|---|---|---|---|---|"]
        for r in res["budgets"]:
            for sig, x in r["signals"].items():
                if "held_out" not in x:
                    continue
                for k in ks:
                    ab, ba = _at(x["held_out"]["A_on_B"], k), _at(x["held_out"]["B_on_A"], k)
                    md.append(f"| {r['tokens']} | {sig} | {k} | {ab['selection']:.4f} | {ab['single_skip_topk']:.4f} | "
                              f"{ba['selection']:.4f} | {ba['single_skip_topk']:.4f} |")
        md.append("")
    md += [provenance_line(res["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
