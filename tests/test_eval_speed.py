"""The speed task's fairness: the models are timed round-robin (the call order, through ``evaluate``), the
reported number is the median over repeats and the student/base ratio is paired per repeat (synthetic timings
with known answers), and decode tokens/s leaves the prompt's forward pass out (a fake clock whose prefill costs
100 s)."""

from __future__ import annotations

import types

import pytest
import torch

from rad_ds.eval.run import EvalConfig, evaluate
from rad_ds.eval.speed import SpeedModel, paired_ratio, summarize
from tests.eval_helpers import save_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("speedmodels"))


def _record_turns(monkeypatch) -> list[str]:
    turns = []
    decode = SpeedModel.decode

    def recording(self):
        turns.append(self.label)
        return decode(self)

    monkeypatch.setattr(SpeedModel, "decode", recording)
    return turns


@pytest.mark.parametrize("interleave", [True, False])
def test_models_are_timed_round_robin(models, tmp_path, monkeypatch, interleave):
    base, student = models
    turns = _record_turns(monkeypatch)
    cfg = EvalConfig(models=[str(base), str(student)], out=str(tmp_path / "o"), tasks=["speed", "ppl"],
                     speed_prompts=2, speed_repeats=3, max_new_tokens=4, progress=False, bootstrap=50,
                     speed_interleave=interleave)
    res = evaluate(cfg)
    if interleave:  # repeat r: base's prompts, then the student's, on the same prompts
        assert turns == ["base", "student"] * 3
    else:
        assert turns == ["base"] * 3 + ["student"] * 3
    rows = res["results"]
    assert [(r["model"], r["task"]) for r in rows] == [("base", "speed"), ("base", "ppl"), ("student", "speed"),
                                                       ("student", "ppl")]  # the table's order is kept
    b, s = rows[0], rows[2]
    for r in (b, s):
        d = r["details"]
        assert d["repeats"] == 3 and d["order"] == ("interleaved" if interleave else "sequential")
        assert len(d["decode_tokens_per_second"]["per_repeat"]) == 3 and d["prompts"] == 2
        assert r["score"] == d["decode_tokens_per_second"]["median"] == sorted(
            d["decode_tokens_per_second"]["per_repeat"])[1]
        assert r["ci95"] == [min(d["decode_tokens_per_second"]["per_repeat"]),
                             max(d["decode_tokens_per_second"]["per_repeat"])]
        assert d["decode_tokens"] == d["plain_tokens"] - d["prompts"]  # the first token belongs to prefill
    assert "paired" not in b["details"]
    p = s["details"]["paired"]
    assert p["against"] == "base"
    per_s, per_b = (r["details"]["decode_tokens_per_second"]["per_repeat"] for r in (s, b))
    assert p["per_repeat"] == pytest.approx([x / y for x, y in zip(per_s, per_b)])  # paired, repeat by repeat
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| model | decode tok/s | prefill tok/s | decode vs base (paired) |" in md
    assert f"| student | {s['score']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}] |" in md
    # the pipeline's comparison table: every score with its interval, and the paired ratio as its own row
    from rad_ds.eval.results import EvalResults
    from rad_ds.pipeline import _results_table

    table = "\n".join(_results_table(EvalResults.load(tmp_path / "o")))
    lo, hi = rows[3]["ci95"]
    assert f"| ppl | perplexity | {rows[1]['score']:.4f} [" in table and f"[{lo:.4f}, {hi:.4f}] (n=" in table
    assert (f"| speed | decode tok/s / base's, paired (median of 3 repeats) | 1 | "
            f"{p['median']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] |") in table


def _rows(decode_rates: list[float]) -> list[list[dict]]:
    """Per repeat, two prompts whose summed decode tokens/s is the given rate (and prefill 1 s each)."""
    return [[{"prompt_tokens": 5, "plain_tokens": 11, "plain_seconds": 1 + 10 / rate, "prefill_seconds": 1.0,
              "decode_tokens": 10, "decode_seconds": 10 / rate} for _ in range(2)] for rate in decode_rates]


def test_median_over_repeats_and_the_paired_ratio():
    base, student = [1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 1.0, 4.0, 2.0, 3.0]
    sb, ss = summarize(_rows(base)), summarize(_rows(student))
    assert sb["decode_tokens_per_second"]["per_repeat"] == pytest.approx(base)
    assert sb["decode_tokens_per_second"]["median"] == pytest.approx(3.0)
    assert sb["decode_tokens_per_second"]["ci95"] == pytest.approx([1.0, 5.0])  # 5 repeats: min..max
    assert sb["decode_tokens_per_second"]["coverage"] == pytest.approx(1 - 2 / 32)
    assert sb["prefill_tokens_per_second"]["median"] == pytest.approx(5.0)  # 10 prompt tokens in 2 s
    # paired: the median of the per-repeat ratios (5, 0.5, 4/3, 0.5, 0.6) is 0.6, while the medians' ratio is 1
    p = paired_ratio(ss["decode_tokens_per_second"]["per_repeat"], sb["decode_tokens_per_second"]["per_repeat"])
    assert p["per_repeat"] == pytest.approx([5.0, 0.5, 4 / 3, 0.5, 0.6])
    assert p["median"] == pytest.approx(0.6) and p["ci95"] == pytest.approx([0.5, 5.0])
    with pytest.raises(ValueError, match="repeats"):
        paired_ratio([1.0], [1.0, 2.0])


def test_decode_tokens_per_second_excludes_the_prefill(monkeypatch):
    """A fake clock: the prompt's forward pass costs 100 s, each later token 1 s. Decode tokens/s is then
    exactly 1 and prefill tokens/s is prompt tokens / 100; including the prefill would give ~0.07."""
    import rad_ds.decoding.spec_decode as sd
    from rad_ds.models.conversion import from_hf_model
    from tests.model_factories import tiny_hf_model

    clock = [0.0]
    monkeypatch.setattr(sd, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = from_hf_model(tiny_hf_model("llama3", max_position_embeddings=512)).eval()

    def tick(module, args):
        clock[0] += 100.0 if args[0].shape[1] > 1 else 1.0

    model.register_forward_pre_hook(tick)
    prompts = [torch.tensor([5, 9, 11, 13, 17, 19, 23]), torch.tensor([7, 8, 9, 10])]
    sm = SpeedModel("m", model, prompts, eos=[], mask=None, max_new_tokens=8, draft_len=4)
    rows = sm.decode()
    for r, p in zip(rows, prompts):
        assert r["prompt_tokens"] == p.numel() and r["plain_tokens"] == 8
        assert r["prefill_seconds"] == 100.0 and r["decode_seconds"] == 7.0 and r["decode_tokens"] == 7
    s = summarize([rows])
    assert s["decode_tokens_per_second"]["median"] == 1.0
    assert s["prefill_tokens_per_second"]["median"] == pytest.approx(11 / 200)
    assert s["plain_tokens_per_second"] == pytest.approx(16 / 214)
