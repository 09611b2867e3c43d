"""Local tasks for EleutherAI's lm-evaluation-harness (``lm_eval --include_path rad_ds/eval/lm_eval_tasks``).

The data is read from the jsonl files in ``data/`` next to this file, or from files of yours (same
fields): ``--metadata '{"gsm_file": "/path/to/gsm8k_test.jsonl", "mc_file": "/path/to/mc.jsonl"}'``.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found (give a jsonl file in --metadata)")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(path, default: str):
    import datasets

    rows = _rows(path or HERE / "data" / default)
    return {"test": datasets.Dataset.from_list(rows)}


def gsm_dataset(gsm_file=None, **_):
    """GSM8K-format records: ``question``, ``answer`` ending in ``#### N``."""
    return _dataset(gsm_file, "gsm_sample.jsonl")


def mc_dataset(mc_file=None, **_):
    """Multiple choice: ``question``, ``choices`` (list of strings), ``answer`` (index of the right one)."""
    return _dataset(mc_file, "mc_sample.jsonl")


def cot_exemplars() -> list[dict]:
    """The 8 chain-of-thought exemplars of Wei et al. (2022), the same as rad-ds's own GSM8K task."""
    from rad_ds.eval.gsm8k import COT_EXEMPLARS  # deferred: lm_eval loads this file by path; mc needs no rad_ds

    return [{"question": q, "target": a} for q, a in COT_EXEMPLARS]


def gsm_process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the final number, extracted as rad-ds does (``#### N``, ``The answer is N``, ...)."""
    from rad_ds.eval.answers import is_correct  # deferred: lm_eval loads this file by path; mc needs no rad_ds

    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
