"""HumanEval and CRUXEval-style scoring: right programs pass, wrong ones fail, whatever form the answer has,
and an answer that forges its own pass report fails."""

from __future__ import annotations

import json

import pytest

from rad_ds.eval.cruxeval import CruxEvalTask, check_predictions, extract_prediction, humaneval_derived
from rad_ds.eval.humaneval import HumanEvalTask, build_check, extract_code, load_problems
from rad_ds.eval.sandbox import SandboxLimits, run_checks, run_programs
from tests.test_eval_sandbox import FORGERS

LIMITS = SandboxLimits(timeout_s=10.0, workers=2)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_the_package_ships_164_problems(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"


def test_canonical_solutions_pass_in_every_answer_form(problems):
    """A sample of problems (every 12th: helpers, imports, nested functions): the canonical solution passes as
    a plain continuation, as a chat code block with the whole function, and as a bare body; an empty or
    wrong answer fails."""
    sample = problems[::12]
    forms = []
    for p in sample:
        full = p["prompt"] + p["canonical_solution"]
        forms += [build_check(p, p["canonical_solution"] + "\n\ndef unrelated():\n    pass\n", chat=False),
                  build_check(p, f"Here is the function:\n```python\n{full}```\nIt loops over the input.", chat=True),
                  build_check(p, f"```python\n{p['canonical_solution']}```", chat=True),
                  build_check(p, "", chat=False),
                  build_check(p, "```python\n    return None\n```", chat=True)]
    rs = run_checks(forms, LIMITS)
    for i, p in enumerate(sample):
        got = [r.passed for r in rs[5 * i:5 * i + 5]]
        assert got == [True, True, True, False, False], (p["task_id"], [(r.status, r.error) for r in rs[5 * i:5 * i + 5]])


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore ```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # unclosed: to the end
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


def test_humaneval_task_scores_what_the_model_wrote(problems):
    task = HumanEvalTask()
    samples = task.load(None, 3, 0)
    outs = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems[:2]] + ["I cannot do that."]
    recs = task.score(samples, outs, chat=True, sandbox=LIMITS)
    assert [r["correct"] for r in recs] == [True, True, False]
    assert recs[0]["task_id"] == "HumanEval/0"
    json.dumps(recs)


def test_humaneval_forged_pass_reports_are_failures(problems):
    """The issue's case: of 4 completions of HumanEval/0 (the canonical one, the frame-walking forger, two
    wrong ones) exactly one passes, so pass@1 is 0.25 (the single-process sandbox gave 0.5); every other
    forger fails too, and the tests still see the prompt's helpers (HumanEval/38's ``encode_cyclic``)."""
    task = HumanEvalTask()
    samples = task.load(None, 1, 0) * 4
    p = problems[0]
    outs = [p["canonical_solution"], FORGERS["frames"], "    return True\n", "    return 1 / 0\n"]
    recs = task.score(samples, outs, chat=False, sandbox=LIMITS)
    assert [r["correct"] for r in recs] == [True, False, False, False], recs
    assert sum(r["correct"] for r in recs) / len(recs) == 0.25
    forged = [build_check(p, body, chat=False) for body in FORGERS.values()]
    helper = problems[38]
    rs = run_checks(forged + [build_check(helper, helper["canonical_solution"], chat=False),
                              build_check(helper, "    return encode_cyclic(s)\n", chat=False)], LIMITS)
    assert [r.passed for r in rs] == [False] * len(FORGERS) + [True, False], [(r.status, r.error) for r in rs]


@pytest.mark.parametrize("answer,prediction", [
    ("assert f([1, 2]) == [2, 4]\n[/ANSWER]", "[2, 4]"),
    ("[ANSWER]\nassert f('a == b') == 'a == b!'\n[/ANSWER]", "'a == b!'"),
    ("```python\nassert f(3) == 9\n```", "9"),
    ("The output is:\nassert f(x) == {'a': 1, 'b': (2, 3)}", "{'a': 1, 'b': (2, 3)}"),
    ("'hello'", "'hello'"),
    ("assert f(1) == \n", ""),
    ("", ""),
])
def test_extract_prediction(answer, prediction):
    assert extract_prediction(answer) == prediction


def test_extract_prediction_prefers_the_asked_call():
    answer = "assert f(17) == 17\nassert f('x9j') == 'x9ja'\nassert f([1, 2], 3) == [1, 2, 3]\n[/ANSWER]"
    assert extract_prediction(answer, "[1,2], 3") == "[1, 2, 3]"
    assert extract_prediction(answer, "0") == "17"  # no assertion for f(0): the first one


def test_check_predictions_literal_and_executed_agree():
    rec = {"code": "def f(x):\n    return sorted(set(x))", "input": "[3, 1, 3]", "output": "[1, 3]"}
    preds = ["[1, 3]", "[1, 3, 3]", "[1,3]", "list((1, 3))", "sorted([3, 1])", "[1, 2 + 1]", "1/0", "w1 w2", "",
             "__import__('os').system('true') or [1, 3]",
             # forgers: an always-equal object (``assert [1, 3] == it`` held in one process), leaving early,
             # calling f is allowed (it is CRUXEval's rule: the assertion runs after the code)
             "type('A', (), {'__eq__': lambda s, o: True})()", "__import__('os')._exit(0)", "f([3, 1, 3])"]
    got = check_predictions([rec] * len(preds), preds, LIMITS)
    assert [g["correct"] for g in got] == [True, False, True, True, True, True, False, False, False, False,
                                           False, False, True]
    assert [g["checked_by"] for g in got][:3] == ["literal"] * 3
    assert got[3]["checked_by"] == "executed" and got[7]["checked_by"] == "syntax"


def test_humaneval_derived_problems_are_right():
    """The offline CRUXEval-style set: f(input) == output holds for every record (checked in the sandbox on a
    sample), the function is renamed f and has no docstring."""
    recs = humaneval_derived()
    assert len(recs) >= 150
    sample = recs[::8]
    rs = run_programs([f"{r['code']}\nassert f({r['input']}) == {r['output']}\n" for r in sample], LIMITS)
    assert all(r.passed for r in rs), [(s["id"], r.error) for s, r in zip(sample, rs) if not r.passed]
    assert all("def f(" in r["code"] and '"""' not in r["code"] for r in recs)


def test_cruxeval_task_from_a_local_file(tmp_path):
    data = tmp_path / "crux.jsonl"
    rows = [{"id": "sample_0", "code": "def f(s):\n    return s[::-1]", "input": "'abc'", "output": "'cba'"},
            {"id": "sample_1", "code": "def f(n):\n    return [i * i for i in range(n)]", "input": "3",
             "output": "[0, 1, 4]"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CruxEvalTask()
    samples = task.load(str(data), None, 0)
    assert "assert f('abc') == ??" in samples[0].text and samples[0].text.endswith("[ANSWER]\n")
    recs = task.score(samples, ["assert f('abc') == 'cba'\n[/ANSWER]", "assert f(3) == [0, 1, 2]"], chat=False,
                      sandbox=LIMITS)
    assert [r["correct"] for r in recs] == [True, False] and recs[0]["id"] == "sample_0"
