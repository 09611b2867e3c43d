"""The evaluation runner on tiny models: deterministic scores, batch composition that changes nothing,
perplexity against a plain forward, speculative decoding against plain decoding, and the outputs."""

from __future__ import annotations

import ast
import json
import math
import os
import pwd

import pytest
import torch

from rad_ds.core.sections import WandbConfig
from rad_ds.eval.answers import extract_answer
from rad_ds.eval.run import EvalConfig, evaluate
from rad_ds.eval.sandbox import SandboxLimits, default_python, sandbox_guards
from tests.eval_helpers import save_models, strip_timings, write_gsm, write_texts
from tests.test_eval_sandbox import _nobody_can_run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("evalmodels"))



def _cfg(model, out, **kw):
    base = dict(models=[str(model)], out=str(out), max_new_tokens=12, batch_size=8, progress=False)
    base.update(kw)
    return EvalConfig(**base)


def test_gsm8k_scores_are_deterministic_and_batching_changes_nothing(models, tmp_path):
    """Run 1 (batches of 8) gives each question's greedy answer; run 2 (batches of 3, other left padding)
    must write the same outputs, and with the references set to run 1's answers for 5 of 8 questions
    (wrong for the rest) it must score exactly 5/8."""
    base, _ = models
    r1 = evaluate(_cfg(base, tmp_path / "a", tasks=["gsm8k"], data={"gsm8k": str(write_gsm(tmp_path / "q.jsonl"))}))
    s1 = [json.loads(x) for x in (tmp_path / "a" / "samples" / "base" / "gsm8k.jsonl").read_text().splitlines()]
    got = [extract_answer(s["output"]) for s in s1]
    assert sum(g is not None for g in got) >= 5, [s["output"] for s in s1]  # the tiny model writes numbers
    right = [i for i, g in enumerate(got) if g is not None][:5]
    answers = [got[i] if i in right else "100000" for i in range(8)]
    r2 = evaluate(_cfg(base, tmp_path / "b", tasks=["gsm8k"], batch_size=3,
                       data={"gsm8k": str(write_gsm(tmp_path / "q2.jsonl", answers=answers))}))
    s2 = [json.loads(x) for x in (tmp_path / "b" / "samples" / "base" / "gsm8k.jsonl").read_text().splitlines()]
    assert [s["output"] for s in s2] == [s["output"] for s in s1]
    assert [s["correct"] for s in s2] == [i in right for i in range(8)]
    assert r2["results"][0]["score"] == 5 / 8 and r2["results"][0]["n"] == 8
    from scipy.stats import binomtest

    wilson = binomtest(5, 8).proportion_ci(method="wilson")  # every accuracy carries n and its 95% interval
    assert r2["results"][0]["ci95"] == pytest.approx([wilson.low, wilson.high], abs=1e-6)
    assert r1["results"][0]["metric"] == "exact_match" and r1["results"][0]["chat"] is True


def test_all_tasks_for_base_and_student(models, tmp_path):
    base, student = models
    texts = write_texts(tmp_path / "texts.txt")
    cfg = _cfg(base, tmp_path / "ev", tasks=["gsm8k", "humaneval", "cruxeval", "ppl", "speed"], limit=3,
               skip_layers=[1, 2], speed_prompts=2, speed_repeats=3, data={"ppl": str(texts)}, timeout=5.0)
    cfg.models = [str(base), str(student)]
    res = evaluate(cfg)
    rows = {(r["model"], r["task"]): r for r in res["results"]}
    assert set(rows) == {(m, t) for m in ("base", "student") for t in cfg.tasks}
    assert res["models"]["base"]["layers"] == "AAAA" and res["models"]["student"]["layers"] == "AAMA"
    for m in ("base", "student"):
        samples = {t: [json.loads(x) for x in (tmp_path / "ev" / "samples" / m / f"{t}.jsonl").read_text().splitlines()]
                   for t in ("gsm8k", "humaneval", "cruxeval")}
        for t, recs in samples.items():
            assert rows[m, t]["n"] == len(recs) == 3
            assert rows[m, t]["score"] == sum(r["correct"] for r in recs) / 3
        # a tiny random model writes words and numbers, never Python: each HumanEval program ran in the
        # sandbox and failed on its syntax, each CRUXEval prediction is refused as no expression
        assert rows[m, "humaneval"]["score"] == 0.0 and rows[m, "cruxeval"]["score"] == 0.0
        assert rows[m, "humaneval"]["details"]["outcomes"] == {"failed": 3}
        assert rows[m, "cruxeval"]["details"]["outcomes"] == {"syntax": 3}
        for r in samples["humaneval"]:
            with pytest.raises(SyntaxError):
                compile(r["output"], "output", "exec")
            assert r["error"].startswith("the program raised SyntaxError")
        for r in samples["cruxeval"]:
            with pytest.raises(SyntaxError):
                ast.parse(r["prediction"], mode="eval")
    # speculative decoding: the base drafts without layers 1,2 and decodes the same tokens as plain decoding;
    # the student has Mamba2 at layer 2, so its row says why it was skipped
    spec = rows["base", "speed"]["details"]["speculative"]
    assert spec["same_tokens"] is True and spec["layers"] == [1, 2] and 0 <= spec["acceptance_rate"] <= 1
    assert "not attention layers" in rows["student", "speed"]["details"]["speculative_skipped"]
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "| model | task | n | metric | score | ± | tokens/s |" in md
    assert "| student | ppl | 3 |" in md  # --limit: 3 documents
    # 0 of 3: Wilson's interval is [0, z^2 / (n + z^2)] = [0, 0.5615]
    assert "| base | humaneval | 3 | pass@1 | 0.0000 [0.0000, 0.5615] |" in md
    assert all(r["ci95"] is not None and r["ci95"][0] <= r["score"] <= r["ci95"][1] for r in res["results"])
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["results"] == json.loads(json.dumps(res["results"]))
    # the code tasks ran, so the sandbox is recorded: what this machine enforces for the evaluation's limits
    guards = res["sandbox"]["guards"]
    nobody_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 and _nobody_can_run(default_python()) else None
    assert res["sandbox"] == {"guards": sandbox_guards(SandboxLimits(timeout_s=5.0)), "timeout_s": 5.0,
                              "memory_mb": 1024, "disk_mb": 64, "python": default_python(),
                              "uid": nobody_uid if nobody_uid is not None else os.geteuid()}
    assert {"rlimits", "audit-hook"} <= set(guards) and {"disk-tmpfs", "disk-watch"} & set(guards)
    if os.geteuid() == 0:
        nobody = _nobody_can_run(default_python())
        assert ("uid-nobody" in guards) == nobody and ("no-capabilities" in guards) == (not nobody)

    # perplexity equals a plain forward over each of the 3 paragraphs (they fit in one window)
    from rad_ds.models.conversion import load_model

    model, tok = load_model(base)
    nll, n, per_doc = 0.0, 0, []
    with torch.no_grad():
        for para in [p for p in texts.read_text().split("\n\n") if p.strip()][:3]:
            ids = tok(para.strip(), return_tensors="pt").input_ids
            logits = model(ids).logits[0, :-1]
            doc = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            nll, n = nll + doc, n + ids.numel() - 1
            per_doc.append(doc / (ids.numel() - 1))
    ppl = rows["base", "ppl"]
    assert ppl["details"]["tokens"] == n
    assert math.isclose(ppl["score"], math.exp(nll / n), rel_tol=1e-5)
    # its interval: a bootstrap over the 3 documents. A resample of one document drawn 3 times has chance 1/27
    # > 2.5%, so the 95% interval runs from the easiest document's perplexity to the hardest one's
    lo, hi = ppl["ci95"]
    assert lo < ppl["score"] < hi and ppl["details"]["interval"]["unit"] == "document"
    assert math.isclose(lo, math.exp(min(per_doc)), rel_tol=1e-5) and math.isclose(hi, math.exp(max(per_doc)),
                                                                                  rel_tol=1e-5)
    assert f"{ppl['score']:.4f} [{lo:.4f}, {hi:.4f}]" in md


def test_perplexity_windows_and_batches_agree(models, tmp_path):
    """Small windows with a stride score each token once; batch size does not change the result."""
    from rad_ds.eval.perplexity import windows

    ws = windows([10, 1, 7], window=4, stride=2)
    scored = [(w.doc, t) for w in ws for t in range(w.score_from, w.end)]
    assert sorted(scored) == [(0, t) for t in range(1, 10)] + [(2, t) for t in range(1, 7)]
    assert all(w.score_from > w.begin and w.end - w.begin <= 4 for w in ws)
    base, _ = models
    texts = write_texts(tmp_path / "t.txt", 4)
    a = evaluate(_cfg(base, tmp_path / "p1", tasks=["ppl"], data={"ppl": str(texts)}, ppl_window=16, ppl_stride=8,
                      batch_size=1))
    b = evaluate(_cfg(base, tmp_path / "p2", tasks=["ppl"], data={"ppl": str(texts)}, ppl_window=16, ppl_stride=8,
                      batch_size=5))
    assert math.isclose(a["results"][0]["score"], b["results"][0]["score"], rel_tol=1e-6)
    assert a["results"][0]["details"]["tokens"] == b["results"][0]["details"]["tokens"]


def test_repeated_runs_are_identical(models, tmp_path):
    base, student = models
    kw = dict(tasks=["gsm8k", "cruxeval", "ppl"], limit=2,
              data={"gsm8k": str(write_gsm(tmp_path / "q.jsonl")), "ppl": str(write_texts(tmp_path / "t.txt"))},
              chat=False)
    a = evaluate(_cfg(student, tmp_path / "r1", **kw))
    b = evaluate(_cfg(student, tmp_path / "r2", **kw))
    assert strip_timings(a) == strip_timings(b)
    assert a["results"][0]["chat"] is False


def test_wandb_offline_run(models, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base, _ = models
    evaluate(_cfg(base, tmp_path / "w", tasks=["gsm8k"], limit=2, max_new_tokens=4, wandb=WandbConfig(True, run="t"),
                  data={"gsm8k": str(write_gsm(tmp_path / "q.jsonl"))}))
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
