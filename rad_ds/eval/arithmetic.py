"""Arithmetic: short expressions (``7 * 8``, ``3 - 9``), greedy answer, exact match on the number.

A task with signal at small sizes: SmolLM2-135M-Instruct solves about half of the default problems (two
operands of one digit, ``+ - *``), where it solves no GSM8K-style word problem, so a student's loss shows as a
drop in accuracy instead of a zero next to a zero. The difficulty was chosen on seed 1 (validation); reported
numbers use other seeds (docs/evaluation.md).

Problems are generated here, seeded and distinct (no expression twice in one set): ``terms`` operands of up
to ``digits`` digits each (uniform over 0 .. 10^digits - 1) joined by operators drawn from ``operators``; the
answer is the integer value with the usual precedence (``*`` before ``+`` and ``-``). Scoring reuses the
GSM8K answer extraction (``answers.extract_answer``: an answer phrase, else the last number), so ``7 * 8 = 56``
and ``The answer is 56.`` are both right.
"""

from __future__ import annotations

import random

from .answers import extract_answer, is_correct
from .tasks import GenerationTask, Sample

OPERATORS = "+-*"
CHAT_PROMPT = "What is {expression}? Answer with just the number."
PLAIN_PROMPT = "Q: What is {expression}?\nA:"


def evaluate_expression(numbers: list[int], ops: list[str]) -> int:
    """``numbers[0] ops[0] numbers[1] ...`` with ``*`` before ``+`` and ``-`` (left to right otherwise)."""
    terms, signs = [numbers[0]], [1]
    for op, x in zip(ops, numbers[1:], strict=True):
        if op == "*":
            terms[-1] *= x
        elif op in "+-":
            terms.append(x)
            signs.append(1 if op == "+" else -1)
        else:
            raise ValueError(f"operator {op!r}: use one of {OPERATORS}")
    return sum(s * t for s, t in zip(signs, terms))


def problem_space(digits: int, terms: int, operators: str) -> int:
    """How many distinct expressions the settings allow."""
    return (10 ** digits) ** terms * len(operators) ** (terms - 1)


def generate_problems(n: int, seed: int, digits: int = 1, terms: int = 2, operators: str = OPERATORS) -> list[dict]:
    """``n`` distinct problems ``{"expression", "answer"}``, the same for the same arguments on any machine."""
    check_settings(digits, terms, operators)
    space = problem_space(digits, terms, operators)
    if n > space:
        raise ValueError(f"arithmetic: {n} problems asked, but {terms} operands of <= {digits} digit(s) with "
                         f"{operators!r} make only {space} distinct ones; raise arithmetic_digits or ask for fewer")
    rng = random.Random(f"rad-ds arithmetic {seed}")  # a str seed is hashed with SHA-512: stable everywhere
    hi, seen, out = 10 ** digits - 1, set(), []
    while len(out) < n:
        numbers = [rng.randint(0, hi) for _ in range(terms)]
        ops = [rng.choice(operators) for _ in range(terms - 1)]
        expression = " ".join([str(numbers[0])] + [f"{o} {x}" for o, x in zip(ops, numbers[1:])])
        if expression not in seen:
            seen.add(expression)
            out.append({"expression": expression, "answer": str(evaluate_expression(numbers, ops))})
    return out


def check_settings(digits: int, terms: int, operators: str) -> None:
    if digits < 1 or terms < 2:
        raise ValueError(f"arithmetic: digits = {digits}, terms = {terms}: need digits >= 1 and terms >= 2")
    bad = sorted(set(operators) - set(OPERATORS))
    if not operators or bad or len(set(operators)) != len(operators):
        raise ValueError(f"arithmetic_operators = {operators!r}: give distinct characters of {OPERATORS!r}, "
                         "e.g. '+-'")


class ArithmeticTask(GenerationTask):
    name = "arithmetic"
    takes_data = False
    metric = "exact_match"
    default_max_new_tokens = 16
    plain_stop = ("\n",)
    default_size = 200  # problems when arithmetic_samples is unset (--limit lowers it)

    def __init__(self, digits: int = 1, terms: int = 2, operators: str = OPERATORS, samples: int | None = None):
        check_settings(digits, terms, operators)
        if samples is not None and samples < 1:
            raise ValueError(f"arithmetic_samples = {samples}: must be >= 1")
        self.digits, self.terms, self.operators, self.samples = digits, terms, operators, samples

    @classmethod
    def from_config(cls, cfg) -> ArithmeticTask:
        return cls(cfg.arithmetic_digits, cfg.arithmetic_terms, cfg.arithmetic_operators, cfg.arithmetic_samples)

    def source(self, data):
        return (f"generated: {self.terms} operands of <= {self.digits} digit(s), operators {self.operators} "
                "(rad_ds.eval.arithmetic, seeded, distinct)")

    def load(self, data, limit, seed):
        """``samples`` problems when set, else the default size capped by ``limit``."""
        n = self.samples or min(limit or self.default_size, self.default_size)
        problems = generate_problems(n, seed, self.digits, self.terms, self.operators)
        return [Sample(i, [{"role": "user", "content": CHAT_PROMPT.format(**p)}], PLAIN_PROMPT.format(**p),
                       p["answer"], {"expression": p["expression"]}) for i, p in enumerate(problems)]

    def score(self, samples, outputs, chat, sandbox=None):
        return [{"index": s.index, "correct": is_correct(o, s.target), "extracted": extract_answer(o),
                 "target": s.target, "expression": s.meta["expression"]} for s, o in zip(samples, outputs)]

    def rows(self, row, records):
        row["details"]["settings"] = {"digits": self.digits, "terms": self.terms, "operators": self.operators}
        return [row]


__all__ = ["ArithmeticTask", "evaluate_expression", "generate_problems", "problem_space"]
