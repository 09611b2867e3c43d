"""Diagnosis that generalises: the swap search, a timing-independent default objective, bootstrap intervals
over prompts, held-out prompts, and the report's new keys."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from rad_ds.core.report import DiagnosisReport, summary_table
from rad_ds.diagnosis.acceptance import AcceptanceEstimator, AcceptanceStats
from rad_ds.diagnosis.cost import CostModel
from rad_ds.diagnosis.search import MaskEvaluator, search_k, swap_order, swap_search
from rad_ds.diagnosis.stability import (
    bootstrap_interval,
    jaccard,
    single_skip_stability,
    split_held_out,
    topk_frequency,
)
from tests.model_factories import save_tiny_with_tokenizer

CANDS = list(range(12))
PLANTED = frozenset({5, 7, 9, 11})
PRIOR = {i: 0.9 if i < 4 else 0.6 if i in PLANTED else 0.3 for i in CANDS}  # ranks the planted layers low


def _planted_value(mask) -> float:
    """Additive values (planted layers best) plus an interaction, so the optimum is not a sum of singles."""
    v = sum(1.0 if i in PLANTED else 0.5 if i < 4 else 0.1 for i in mask)
    return v + (0.2 if {5, 11} <= set(mask) else 0.0)


def _evaluator(value) -> MaskEvaluator:
    def stats_fn(mask):
        return AcceptanceStats(accepted=round(1000 * value(mask)), drafted=10_000, rounds=100, tokens=1000)

    return MaskEvaluator(stats_fn, lambda m, s: s.acceptance_rate)


def test_swap_search_finds_a_planted_mask_that_the_single_skip_topk_misses():
    masks = [frozenset(c) for c in itertools.combinations(CANDS, 4)]
    assert max(masks, key=_planted_value) == PLANTED  # brute force: the planted mask is the optimum
    ev = _evaluator(_planted_value)
    start = ev(frozenset({0, 1, 2, 3}))  # the prior's top-4
    best, rec = swap_search(ev, CANDS, start, budget=200, prior=PRIOR)
    assert best.mask == PLANTED and best.method == "swap"
    assert rec["local_optimum"] and len(rec["moves"]) >= 4 and rec["evaluations"] <= 200
    assert [m["objective"] for m in rec["moves"]] == sorted(m["objective"] for m in rec["moves"])
    # a small budget stops early, better than the start but short of the optimum
    ev2 = _evaluator(_planted_value)
    best2, rec2 = swap_search(ev2, CANDS, ev2(frozenset({0, 1, 2, 3})), budget=2, prior=PRIOR)
    assert rec2["evaluations"] == 2 and not rec2["local_optimum"]
    assert start.objective < best2.objective < best.objective
    # the whole per-k procedure: its gains are the planted values' differences (objective = value / 10), worked
    # out here from each baseline's mask: 4.2 - 2.0 over the single-skip top-k, 0 only over a baseline that
    # found the planted mask itself
    ev3 = _evaluator(_planted_value)
    res = search_k(ev3, CANDS, 4, PRIOR, trials=8, seed=0, swap_evals=100)
    assert res.best.mask == PLANTED
    assert res.candidates["single_skip_topk"].mask == frozenset({0, 1, 2, 3})
    gains = res.gains()
    assert set(gains) == set(res.candidates) == {"bo", "single_skip_topk"}
    for m, s in res.candidates.items():
        want = (round(1000 * _planted_value(PLANTED)) - round(1000 * _planted_value(s.mask))) / 10_000
        assert gains[m]["objective"] == pytest.approx(want, abs=1e-12), m
        assert gains[m]["acceptance_rate"] == pytest.approx(want, abs=1e-12), m
        assert (gains[m]["objective"] > 0) == (s.mask != PLANTED), m
    assert gains["single_skip_topk"]["objective"] == pytest.approx(0.22, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_swap_search_is_never_worse_than_its_start_and_respects_its_budget(seed):
    def value(mask):  # an arbitrary (rugged) objective
        return random.Random(f"{seed}:{sorted(mask)}").random()

    rng = random.Random(seed)
    for budget in (0, 3, 500):
        ev = _evaluator(value)
        start = ev(frozenset(rng.sample(CANDS, 3)))
        before = ev.evaluations
        best, rec = swap_search(ev, CANDS, start, budget=budget, prior={i: rng.random() for i in CANDS})
        assert best.objective >= start.objective
        assert rec["evaluations"] == ev.evaluations - before <= budget
        if budget == 0:
            assert best is start and not rec["local_optimum"]
        if rec["local_optimum"]:  # checked by brute force over the neighbourhood
            assert all(ev((best.mask - {o}) | {i}).objective <= best.objective
                       for o, i in swap_order(best.mask, CANDS, PRIOR))
        again = swap_search(_evaluator(value), CANDS, start, budget=budget, prior={i: 0.0 for i in CANDS})
        assert again[0].objective >= start.objective


def test_swap_order_puts_the_most_promising_moves_first():
    prior = {0: 0.9, 1: 0.1, 2: 0.8, 3: 0.5}
    assert swap_order(frozenset({0, 1}), [0, 1, 2, 3], prior) == [(1, 2), (1, 3), (0, 2), (0, 3)]


def test_bootstrap_interval_contains_the_estimate_shrinks_and_matches_the_normal_approximation():
    rng = np.random.default_rng(0)

    def sample(n):
        rates = rng.beta(8, 3, size=n)  # prompts differ in how easy they are
        return rng.binomial(40, rates), np.full(n, 40)

    widths = {}
    for n in (10, 40, 160):
        acc, dr = sample(n)
        lo, hi = bootstrap_interval(acc, dr, resamples=2000, seed=1)
        point = acc.sum() / dr.sum()
        assert lo < point < hi
        widths[n] = hi - lo
    assert widths[160] < widths[40] < widths[10]
    assert widths[160] < 0.5 * widths[10]  # ~1/sqrt(n): 16x the prompts, about a quarter of the width
    # independent oracle: with equal drafted counts the ratio is a mean, whose 95% interval is ~ +-1.96 SE
    acc, dr = sample(400)
    r = acc / dr
    lo, hi = bootstrap_interval(acc, dr, resamples=4000, seed=2)
    assert hi - lo == pytest.approx(2 * 1.96 * r.std(ddof=1) / np.sqrt(len(r)), rel=0.12)
    assert bootstrap_interval(acc, dr, resamples=500, seed=3) == bootstrap_interval(acc, dr, resamples=500, seed=3)


def test_topk_frequency_and_single_skip_stability_against_a_loop():
    rng = np.random.default_rng(0)
    cands = [2, 3, 5, 7, 8]
    ratios = rng.integers(0, 4, size=(50, len(cands))) / 4  # many ties: the lower layer wins them
    freq = topk_frequency(ratios, cands, 2)
    want = {c: 0 for c in cands}
    for row in ratios:
        for c in sorted(cands, key=lambda c: (-row[cands.index(c)], c))[:2]:
            want[c] += 1
    assert freq == {c: want[c] / 50 for c in cands}
    # per-prompt totals of a clearly best layer (7) and a clearly worst (2): intervals and top-1 share say so
    per_prompt = {c: torch.tensor([[int(30 * (0.2 + 0.1 * j) + (p % 3)), 40, 10, 50] for p in range(12)])
                  for j, c in enumerate(cands)}
    per_prompt[7][:, 0] = 39
    intervals, topk = single_skip_stability(per_prompt, cands, [1, 2], resamples=300, seed=0)
    for c in cands:
        point = per_prompt[c][:, 0].sum().item() / per_prompt[c][:, 1].sum().item()
        assert intervals[c][0] <= point <= intervals[c][1]
    assert intervals[7] == (39 / 40, 39 / 40) and topk[1][7] == 1.0 and topk[2][2] == 0.0
    assert sum(topk[2].values()) == pytest.approx(2.0)


def test_jaccard_and_held_out_split():
    assert jaccard([1, 2, 3, 4], [2, 3, 4, 5]) == pytest.approx(3 / 5) and jaccard([], []) == 1.0
    ps = [torch.tensor([i, i + 1]) for i in range(8)]
    ps[5] = ps[1].clone()  # a repeated prompt must not land in both sets
    sel, held = split_held_out(ps, 4, 3)
    assert [p.tolist() for p in sel] == [p.tolist() for p in ps[:4]]
    assert [p.tolist() for p in held] == [ps[4].tolist(), ps[6].tolist(), ps[7].tolist()]
    assert split_held_out(ps, 4, 10)[1] and len(split_held_out(ps, 4, 10)[1]) == 3  # as many as there are
    assert split_held_out(ps, 0, 3) == (ps, [])  # all for the search: nothing left to hold out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diagstab")
    base, _ = save_tiny_with_tokenizer(tmp, num_hidden_layers=6)
    prompts = tmp / "prompts.jsonl"
    rows = [" ".join(f"w{(7 * i + 3 * j) % 300}" for j in range(4 + i % 5)) for i in range(9)]
    rows[5] = rows[1]  # a duplicate of a search prompt: the held-out set skips it
    prompts.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return tmp, base, prompts


def _cfg(tiny, out, **kw):
    from rad_ds.diagnosis.config import DiagnoseConfig

    _, base, prompts = tiny
    kw = {"k": [1, 2], "greedy_baseline": True, "prompts": str(prompts), "num_prompts": 4, "held_out": 3, "trials": 4,
          "swap_evals": 6,
          "max_new_tokens": 16, "recheck_prompts": 0, "progress": False, "bootstrap": 200, **kw}
    return DiagnoseConfig(model=str(base), out=str(out), **kw)


def test_default_objective_does_not_depend_on_timings(tiny, monkeypatch):
    """Two runs whose (fake) timings differ: the default objective gives the same scores and layers; the
    measured cost model, fed the same timings, does not (so the check has power)."""
    import rad_ds.diagnosis.cost as cost
    from rad_ds.diagnosis.run import diagnose

    tmp = tiny[0]
    fakes = iter([CostModel("measured", 0.01, 0.9, 1.0), CostModel("measured", 0.15, 0.0, 0.2)] * 2)
    monkeypatch.setattr(cost, "measure_cost_model", lambda *a, **k: next(fakes))
    reps = {}
    for name, kw in [("default_a", {}), ("default_b", {}), ("measured_a", {"cost_model": "measured"}),
                     ("measured_b", {"cost_model": "measured"})]:
        reps[name] = diagnose(_cfg(tiny, tmp / name, held_out=0, **kw))

    def chosen(rep):
        return [(s["k"], s["layers"], s["estimated_speedup"], s["acceptance_rate"]) for s in rep["selections"]]

    assert reps["default_a"]["settings"]["hardware_independent"] is True
    assert reps["default_a"]["cost_model"]["kind"] == "weights"
    assert chosen(reps["default_a"]) == chosen(reps["default_b"])
    assert reps["default_a"]["trials"] == reps["default_b"]["trials"]
    assert reps["measured_a"]["settings"]["hardware_independent"] is False
    assert [c[2] for c in chosen(reps["measured_a"])] != [c[2] for c in chosen(reps["measured_b"])]


def test_held_out_prompts_are_disjoint_and_scored_like_an_independent_estimator(tiny):
    from rad_ds.diagnosis.chart import draw_chart
    from rad_ds.diagnosis.run import Diagnosis

    tmp = tiny[0]
    cfg = _cfg(tiny, tmp / "held").validate()
    d = Diagnosis(cfg)
    search_ids = {tuple(p.tolist()) for p in d.prompts}
    held_ids = [tuple(p.tolist()) for p in d.held_prompts]
    # rows 0-3 search, rows 4-6 held out less row 5 (a repeat of row 1)
    assert len(search_ids) == 4 and len(held_ids) == 2 and not search_ids & set(held_ids)
    rep = d.run()
    held = rep["held_out"]
    assert held["n"] == 2 and rep["prompts"]["held_out"] == 2
    oracle = AcceptanceEstimator(d.model, d.held_prompts, cfg.max_new_tokens, cfg.draft_len, eos_token_id=d.eos,
                                 signal=cfg.signal, temperature=cfg.temperature)
    assert rep["settings"]["signal"] == cfg.signal == "expected"

    def scored(est, layers):  # what a mask scores on ``est``'s prompts, computed here (the report's cost model)
        st = est.stats(layers)
        return {"acceptance_rate": st.acceptance_rate, "mean_alpha": st.mean_alpha,
                "estimated_speedup": d.cost.estimated_speedup(len(layers), st.accepted, st.drafted, st.rounds,
                                                              st.tokens)}

    # held-out gains: the chosen layers' score minus each baseline's, both scored by the independent estimator
    # on prompts the search never saw (nothing makes these >= 0: a choice that overfits shows as a loss here)
    for row in held["selections"]:
        assert set(row["baselines"]) == set(row["gains"]) == {"single_skip_topk", "greedy", "bo"}
        chosen = scored(oracle, row["layers"])
        for key in chosen:
            assert row[key] == pytest.approx(chosen[key], rel=1e-12), key
        for m, b in row["baselines"].items():
            base = scored(oracle, b["layers"])
            for key in chosen:
                assert b[key] == pytest.approx(base[key], rel=1e-12), (m, key)
                assert row["gains"][m][key] == pytest.approx(chosen[key] - base[key], abs=1e-12), (m, key)
    # the report's new keys round-trip through DiagnosisReport
    loaded = DiagnosisReport.load(tmp / "held")
    assert loaded.data == json.loads(json.dumps(rep.data))
    # the search's gains, likewise against an independent estimator on the search prompts (one process: all of them)
    searched = AcceptanceEstimator(d.model, d.prompts, cfg.max_new_tokens, cfg.draft_len, eos_token_id=d.eos,
                                   signal=cfg.signal, temperature=cfg.temperature)
    for s in loaded["selections"]:
        chosen = scored(searched, s["layers"])
        assert s["objective"] == pytest.approx(chosen["estimated_speedup"], rel=1e-12)
        for m, g in s["gains"].items():
            base = scored(searched, s["layers"] if m == s["method"] else s["baselines"][m]["layers"])
            assert g["objective"] == pytest.approx(chosen["estimated_speedup"] - base["estimated_speedup"], abs=1e-12)
            assert g["acceptance_rate"] == pytest.approx(chosen["acceptance_rate"] - base["acceptance_rate"],
                                                         abs=1e-12)
    for s in loaded["selections"]:
        sel = loaded.selection(s["k"])
        assert list(sel.layers) == s["layers"] and sel.method == s["method"]
        assert s["method"] in ("bo", "single_skip_topk", "greedy", "swap")
        assert s["objective"] == s["estimated_speedup"]
        assert s["acceptance_ci"][0] <= s["acceptance_rate"] <= s["acceptance_ci"][1]
        assert set(s["gains"]) == {"bo", "single_skip_topk", "greedy"}
        assert s["swap"]["evaluations"] <= cfg.swap_evals
    for layer in loaded["layers"]:
        lo, hi = layer["redundancy_ci"]
        assert lo <= layer["redundancy"] <= hi
    freq = loaded["stability"]["single_skip_topk_frequency"]
    assert set(freq) == {"1", "2"} and sum(freq["2"].values()) == pytest.approx(2.0)
    table = loaded.summary_table()
    assert "vs single-skip top-k" in table and "held-out" in table
    # a report from before these keys still reads, tabulates and draws
    old = json.loads(json.dumps(rep.data))
    for key in ("held_out", "stability"):
        old.pop(key)
    for s in old["selections"]:
        for key in ("gains", "swap", "acceptance_ci", "objective"):
            s.pop(key)
    for layer in old["layers"]:
        layer.pop("redundancy_ci")
    assert "vs greedy" not in summary_table(old)
    assert draw_chart(old, tmp / "old.png").stat().st_size > 10_000
