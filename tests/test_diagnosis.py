"""Diagnosis: lossless self-speculative decoding, exact acceptance estimation, search, reports."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from rad_ds.core.sections import WandbConfig
from rad_ds.diagnosis import (
    AcceptanceEstimator,
    PrefixRunner,
    SelfSpeculativeDecoder,
    SpecConfig,
    plain_decode,
    topk_mask,
)
from rad_ds.diagnosis.acceptance import AcceptanceStats
from rad_ds.diagnosis.cost import CostModel, weights_cost_model
from rad_ds.diagnosis.search import MaskEvaluator, bo_search, greedy_buildup, single_skip_scores
from rad_ds.models.conversion import from_hf_model
from rad_ds.surgery import replace_attention
from tests.model_factories import sharpen, tiny_hf_model

EOS = 144


def _model(family="llama3", mamba=(), layers=6, dtype=torch.float64):
    m = sharpen(from_hf_model(tiny_hf_model(family, num_hidden_layers=layers)))
    if mamba:
        replace_attention(m, list(mamba))
    return m.to(dtype).eval()


def _prompts(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 320, (int(torch.randint(3, 15, (1,), generator=g)),), generator=g) for _ in range(n)]


MASKS = [(0,), (1,), (2, 3), (0, 5), (1, 2, 3, 4)]


@pytest.mark.parametrize("mamba", [(), (3,)], ids=["attention", "hybrid"])
def test_greedy_self_speculative_output_equals_plain_greedy(mamba):
    model = _model(mamba=mamba)
    masks = [m for m in MASKS if not set(m) & set(mamba)]
    for p in _prompts(2):
        ref = plain_decode(model, p, 30, eos_token_id=EOS).tokens
        for mask, share, adaptive, g in itertools.product(masks[:3], [False, True], [False, True], [1, 4]):
            cfg = SpecConfig(draft_len=g, max_new_tokens=30, share_kv=share, adaptive_exit=adaptive,
                             exit_threshold=0.3, eos_token_id=EOS)
            got = SelfSpeculativeDecoder(model, mask, cfg).generate(p)
            assert got.tokens == ref, (mask, share, adaptive, g)
            assert sum(got.accepted) + got.rounds >= len(got.tokens)  # bookkeeping is consistent


def test_greedy_output_equals_hf_generate_fp32():
    model = _model(dtype=torch.float32)
    p = _prompts(1)[0]
    hf = model.generate(p[None], max_new_tokens=30, do_sample=False, pad_token_id=0)[0, p.numel():].tolist()
    got = SelfSpeculativeDecoder(model, (1, 3), SpecConfig(draft_len=3, max_new_tokens=30)).generate(p).tokens
    assert got == hf


@pytest.mark.parametrize("mamba", [(), (2,)], ids=["attention", "hybrid"])
def test_estimator_trace_equals_real_decoder(mamba):
    """The parallel-forward estimator gives exactly the real decoder's accepted lengths, round by round."""
    model = _model(mamba=mamba)
    prompts = _prompts(4)
    for g in (2, 4):
        est = AcceptanceEstimator(model, prompts, 36, g, eos_token_id=EOS)
        spread = set()
        for mask in MASKS:
            if set(mask) & set(mamba):
                continue
            real = [SelfSpeculativeDecoder(model, mask, SpecConfig(draft_len=g, max_new_tokens=36, eos_token_id=EOS))
                    .generate(p) for p in prompts]
            assert est.trace(mask) == [r.accepted for r in real], (g, mask)
            st = est.stats(mask)
            assert st.accepted == sum(sum(r.accepted) for r in real)
            assert st.drafted == sum(sum(r.drafted) for r in real)
            assert st.tokens == sum(len(r.tokens) for r in real)
            spread.add(round(st.acceptance_rate, 3))
        assert len(spread) >= 3  # the masks really differ, so the equality is not vacuous


def test_estimator_handles_eos_inside_a_round():
    """Prompts whose greedy continuation stops at EOS before max_new_tokens."""
    model = _model()
    prompts = _prompts(12, seed=3)
    est = AcceptanceEstimator(model, prompts, 40, 4, eos_token_id=list(range(100, 140)))
    ended = [y for y in est.continuations if len(y) < 40]
    assert ended, "no continuation hit an EOS: the test would not cover it"
    for mask in MASKS[:3]:
        real = [SelfSpeculativeDecoder(model, mask, SpecConfig(draft_len=4, max_new_tokens=40,
                                                                eos_token_id=list(range(100, 140)))).generate(p)
                for p in prompts]
        assert est.trace(mask) == [r.accepted for r in real]
        assert [r.tokens for r in real] == est.continuations


def test_prefix_runner_equals_model_forward():
    model = _model(family="mistral", dtype=torch.float32)  # sliding window too
    seqs = [torch.randint(0, 320, (20,)), torch.randint(0, 320, (9,))]
    runner = PrefixRunner(model, seqs)
    for mask in [(), (2,), (0, 4)]:
        for s, ids in enumerate(seqs):
            with torch.no_grad():
                ref = model(ids[None], skip_layers=mask).logits[0]
            assert torch.equal(runner.logits(s, frozenset(mask)), ref)
            assert torch.allclose(runner.logits(s, frozenset(mask), start=5), ref[5:], atol=1e-5, rtol=0)


def test_sampling_verification_has_the_full_models_distribution():
    """Speculative sampling: the joint law of the generated tokens is the full model's (chi-square),
    while the draft's own law is clearly rejected by the same test."""
    from tests.model_factories import tiny_hf_model as th

    torch.manual_seed(0)
    model = from_hf_model(th("llama", vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1)).double().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
        for i in (0, 1):  # make the skipped attention matter, so the draft's law is far from the model's
            model.model.layers[i].self_attn.o_proj.weight.mul_(8)
    prompt = torch.tensor([1, 4, 2])
    mask = (0, 1)

    def exact(skip):
        probs = {}
        for t1, t2 in itertools.product(range(6), repeat=2):
            with torch.no_grad():
                l1 = model(prompt[None], skip_layers=skip).logits[0, -1].softmax(-1)
                l2 = model(torch.cat([prompt, torch.tensor([t1])])[None], skip_layers=skip).logits[0, -1].softmax(-1)
            probs[(t1, t2)] = float(l1[t1] * l2[t2])
        return probs

    p_full, p_draft = exact(()), exact(mask)
    assert sum(abs(p_full[k] - p_draft[k]) for k in p_full) > 0.2  # the draft really differs
    gen = torch.Generator().manual_seed(123)
    dec = SelfSpeculativeDecoder(model, mask, SpecConfig(draft_len=2, max_new_tokens=2, sampling=True))
    n = 3000
    counts = Counter(tuple(dec.generate(prompt, generator=gen).tokens) for _ in range(n))
    assert sum(counts.values()) == n and all(len(k) == 2 for k in counts)

    def chi2(probs):
        keys = sorted(probs, key=lambda k: -probs[k])
        stat, df, rest_e, rest_o = 0.0, 0, 0.0, 0
        for k in keys:
            e = probs[k] * n
            if e >= 5:
                stat += (counts.get(k, 0) - e) ** 2 / e
                df += 1
            else:
                rest_e += e
                rest_o += counts.get(k, 0)
        if rest_e > 0:
            stat += (rest_o - rest_e) ** 2 / rest_e
            df += 1
        return stat, df - 1

    def p_value(stat, df):  # chi-square survival function = regularised upper incomplete gamma
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))

    stat, df = chi2(p_full)
    assert p_value(stat, df) > 1e-3, (stat, df)
    stat_d, df_d = chi2(p_draft)
    assert p_value(stat_d, df_d) < 1e-6  # the test has power: the draft's law is rejected


def test_topk_mask_and_search_find_the_optimum():
    cands = list(range(12))
    assert topk_mask([0.1, 0.9, 0.5, 0.9] + [0.0] * 8, cands, 2) == frozenset({1, 3})
    good = {2, 5, 6}

    def stats_fn(mask):  # acceptance grows with the good layers, plus a small interaction term
        hit = len(mask & good)
        return AcceptanceStats(accepted=10 * hit + (5 if {2, 6} <= mask else 0), drafted=40, rounds=10,
                               tokens=10 * hit + 10)

    ev = MaskEvaluator(stats_fn, lambda m, s: s.acceptance_rate)
    single = single_skip_scores(ev, cands)
    assert {i for i in cands if single[i].objective > 0} == good
    prior = {i: single[i].objective for i in cands}
    best, trials = bo_search(ev, cands, 3, 40, seed=0, warm_start=prior)
    assert best.mask == frozenset(good)
    ev2 = MaskEvaluator(stats_fn, lambda m, s: s.acceptance_rate)
    assert bo_search(ev2, cands, 3, 40, seed=0, warm_start=prior)[1] == trials  # seeded, reproducible
    # without a prior, on a small space (15 masks), TPE still gets there
    ev3 = MaskEvaluator(stats_fn, lambda m, s: s.acceptance_rate)
    assert bo_search(ev3, [0, 1, 2, 3, 5, 6], 2, 30, seed=0)[0].mask == frozenset({2, 6})
    gr = greedy_buildup(ev, cands, 3)
    assert gr[3].mask == frozenset(good)


def test_cost_models():
    c = CostModel("measured", attn_fraction=0.02, verify_slope=0.1)
    # no drafts accepted: every round pays a draft step and a verify for one token
    assert c.estimated_speedup(2, accepted=0, drafted=10, rounds=10, tokens=10) < 1
    # everything accepted with cheap drafts: faster than plain decoding
    w = CostModel("weights", attn_fraction=0.1, verify_slope=0.0)
    assert w.estimated_speedup(4, accepted=40, drafted=40, rounds=10, tokens=50) == pytest.approx(50 / (40 * 0.6 + 10))
    model = _model(dtype=torch.float32)
    wc = weights_cost_model(model)
    assert 0 < wc.attn_fraction < 1 / 6


# redundant attention layers planted in the end-to-end model: their o_proj scaled by 0.1, so they barely write to
# the residual stream, the others' left whole. The plant fixes the set, not an order within it (which of two
# planted layers a few prompts favour is noise, so k < 3 is checked as a subset)
PLANTED = [1, 3, 4]
PLANTED_SCALES = [0.1 if i in PLANTED else 1.0 for i in range(6)]


def test_diagnose_end_to_end_and_replace_from_report(tmp_path, monkeypatch):
    """The whole stage in-process on a tiny model with planted redundant layers, a tokenizer and a jsonl of
    prompts: it finds the planted layers, and a student is built from its report."""
    from rad_ds.diagnosis.run import DiagnoseConfig, diagnose
    from rad_ds.surgery import build_student
    from tests.model_factories import tiny_tokenizer

    base = tmp_path / "base"
    planted = sharpen(from_hf_model(tiny_hf_model("llama3", num_hidden_layers=6)), attn_scales=PLANTED_SCALES)
    planted.save_pretrained(base)
    tiny_tokenizer(planted.config.vocab_size).save_pretrained(base)
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": " ".join(f"w{(7 * i + j) % 300}" for j in range(5 + i))}) + "\n")
    out = tmp_path / "diag"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rep = diagnose(DiagnoseConfig(model=str(base), out=str(out), k=[1, 2, 3], prompts=str(prompts), trials=12,
                                  max_new_tokens=24, cost_model="weights", recheck_prompts=2, progress=False,
                                  wandb=WandbConfig(True, run="diag-test"), signal="greedy"))
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # a real (offline) wandb run was logged
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["selections"] == json.loads(json.dumps(rep["selections"]))
    assert (out / "redundancy.png").stat().st_size > 10_000
    assert [d["index"] for d in on_disk["layers"]] == list(range(6))
    assert all(0 <= d["redundancy"] <= 1 for d in on_disk["layers"])
    for s in on_disk["selections"]:
        assert len(s["layers"]) == s["k"] and s["estimator_exact"] is True
        assert {"acceptance_rate", "mean_accepted_length", "estimated_speedup", "measured_speedup"} <= set(s)
    assert len(on_disk["trials"]) == 36
    # the planted layers are found: the most redundant by single-skip acceptance, and what each k chooses
    redundancy = {d["index"]: d["redundancy"] for d in on_disk["layers"]}
    assert min(redundancy[i] for i in PLANTED) > max(r for i, r in redundancy.items() if i not in PLANTED), redundancy
    chosen = {s["k"]: s["layers"] for s in on_disk["selections"]}
    assert chosen[3] == PLANTED and set(chosen[1]) < set(PLANTED) and set(chosen[2]) < set(PLANTED), chosen
    student = tmp_path / "student"
    rec = build_student(str(base), student, report=out / "report.json", k=2)
    assert rec.layers == on_disk["selections"][1]["layers"]
    assert rec.selection["k"] == 2


def test_measured_objective_runs_the_real_decoder(tmp_path):
    """--objective measured (paper-faithful): each trial is scored by the real decoder's wall clock."""
    from rad_ds.diagnosis.run import DiagnoseConfig, diagnose
    from tests.model_factories import save_tiny_with_tokenizer

    base, _ = save_tiny_with_tokenizer(tmp_path, num_hidden_layers=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3\nw4 w5 w6 w7\n")
    rep = diagnose(DiagnoseConfig(model=str(base), out=str(tmp_path / "d"), k=[2], prompts=str(prompts), trials=3,
                                  max_new_tokens=12, objective="measured", recheck_prompts=0, progress=False,
                                  chat=False))
    sel = rep["selections"][0]
    assert rep["settings"]["objective"] == "measured" and sel["measured_speedup"] is None
    assert sel["estimated_speedup"] > 0  # a measured tokens/s ratio
    assert len(rep["trials"]) == 3
