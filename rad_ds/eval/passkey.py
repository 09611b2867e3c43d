"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a 5-digit key hidden at a chosen depth in
repeated filler text, the model asked for it at the end. Hybrids lose in-context retrieval first (a Mamba2 layer
keeps a fixed-size state, not the context), so this is where a student's gap shows before perplexity moves.

The prompt is the paper's: the task description, the filler ("The grass is green. The sky is blue. ..."), the
needle ("The pass key is 68217. Remember it. 68217 is the pass key.") at ``depth`` (0: right after the
description, 1: right before the question), and the question ("What is the pass key? The pass key is"); the
parts are joined by newlines. It is a completion, prompted as plain text also for chat models
(``chat_prompts = False``; ``render`` can build the chat form too, the whole prompt as the user's turn).

A sample is one (context, depth, key): ``context`` is the prompt's length in the model's own tokens (filled
with whole filler sentences, so it is ``context`` minus less than one sentence), ``depth`` the fraction of the
filler before the needle. Samples are built per tokenizer (``prepare``), so every model sees
prompts of the requested length; contexts that do not fit the model (its positions minus the new tokens) are
skipped and listed in the row. The answer is right when the first number of the output is the key.

Rows (lm-evaluation-harness style, one task, one metric per length as in its RULER tasks): ``exact_match`` over
all cells, then one row per context, metric ``exact_match@<context>``, with the context in ``context`` and the
per-depth scores in ``details.depths``; each with a Wilson 95% interval. ``figures`` draws the heat map.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

from .heatmap import passkey_heatmap
from .results import safe_name
from .tasks import GenerationTask, Sample, accuracy, accuracy_interval

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CONTEXTS = [512, 1024, 2048, 4096]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
_FIRST_NUMBER = re.compile(r"\d+")


def pass_key(seed: int, context: int, depth: float, i: int) -> str:
    """The 5-digit key of one sample (seeded by everything that names it: stable across grids)."""
    return str(random.Random(f"rad-ds passkey {seed} {context} {depth:.6f} {i}").randint(10000, 99999))


def build_text(n_filler: int, depth: float, key: str) -> tuple[str, int, int, int]:
    """The prompt text with ``n_filler`` filler sentences and the needle after ``round(depth * n_filler)`` of them;
    returns (text, character where the filler begins, where the needle begins, where the question begins)."""
    cut = round(depth * n_filler)
    sentences = [FILLER[j % len(FILLER)] for j in range(n_filler)]
    before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
    parts = [DESCRIPTION] + [p for p in (before, NEEDLE.format(key=key), after) if p] + [QUESTION]
    text = "\n".join(parts)
    hay = len(DESCRIPTION) + 1
    return text, hay, text.index(NEEDLE.format(key=key)), len(text) - len(QUESTION)


class _Encoder:
    """The prompt's tokens as the runner encodes them (``decoding.prompts.encode``), with character offsets."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat

    def __call__(self, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """(ids, offsets into the rendered prompt, where ``text`` begins in it)."""
        if self.chat:
            rendered = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=False)
            enc = self.tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
            start = rendered.index(text)
        else:
            enc = self.tok(text, return_offsets_mapping=True)
            start = 0
        return enc["input_ids"], enc["offset_mapping"], start


def _token_at(offsets, char: int) -> int:
    """Index of the first token that ends after character ``char`` (the one holding it)."""
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


def render(tokenizer, chat: bool, context: int, depth: float, key: str) -> dict:
    """The longest prompt of whole filler sentences with at most ``context`` tokens, and where its parts are in
    tokens: ``{"text", "prompt_tokens", "needle_token", "filler_tokens", "depth_tokens"}`` (``filler_tokens``: the
    tokens between the description and the question, the needle's excluded; ``depth_tokens``: the share of them
    before the needle)."""
    enc = _Encoder(tokenizer, chat)
    length = lambda m: len(enc(build_text(m, depth, key)[0])[0])  # noqa: E731
    if length(0) > context:
        raise ValueError(f"passkey context {context}: the prompt without filler has {length(0)} tokens already; "
                         "give longer passkey_contexts")
    lo, hi = 0, context  # every sentence is >= 1 token, so ``context`` sentences overflow
    while lo < hi:  # the largest filler count that fits (the length grows with it)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) <= context else (lo, mid - 1)
    text, hay_c, needle_c, question_c = build_text(lo, depth, key)
    ids, offsets, start = enc(text)
    hay, needle, question = (_token_at(offsets, start + c) for c in (hay_c, needle_c, question_c))
    needle_end = _token_at(offsets, start + needle_c + len(NEEDLE.format(key=key)) - 1) + 1
    filler = question - hay - (needle_end - needle)
    return {"text": text, "prompt_tokens": len(ids), "needle_token": needle, "filler_tokens": filler,
            "filler_sentences": lo, "depth_tokens": (needle - hay) / filler if filler > 0 else 0.0}


def first_number(output: str) -> str | None:
    m = _FIRST_NUMBER.search(output or "")
    return m.group(0) if m else None


class PasskeyTask(GenerationTask):
    name = "passkey"
    takes_data = False
    metric = "exact_match"
    default_max_new_tokens = 16
    plain_stop = ("\n",)
    batch_tokens = 16384  # prompt tokens per batch: long prompts go a few at a time
    # the paper's completion ("... The pass key is"), also for chat models: under SmolLM2-135M-Instruct's template
    # the model answers "The pass key is a magical key that ..." (6 of 18 right on seed 1 at 512-4096 tokens, 18 of
    # 18 as a completion), which measures instruction following, not retrieval
    chat_prompts = False

    default_samples = 2  # per context and depth, when ``samples`` is unset

    def __init__(self, contexts=None, depths=None, samples: int | None = None):
        self.contexts = sorted({int(c) for c in (contexts or CONTEXTS)})
        self.depths = sorted({float(d) for d in (DEPTHS if depths is None else depths)})
        if not self.contexts or self.contexts[0] < 64:
            raise ValueError(f"passkey_contexts = {contexts}: give prompt lengths >= 64 tokens, e.g. 512,1024,2048")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"passkey_depths = {depths}: give fractions in [0, 1], e.g. 0,0.5,1")
        if samples is not None and samples < 1:
            raise ValueError(f"passkey_samples = {samples}: must be >= 1 (samples per context and depth)")
        self.samples = samples
        self.per_cell = 0  # samples per (context, depth), set by ``load``
        self.skipped: list[int] = []  # contexts the current model cannot take, set by ``prepare``

    @classmethod
    def from_config(cls, cfg) -> PasskeyTask:
        return cls(cfg.passkey_contexts, cfg.passkey_depths, cfg.passkey_samples)

    def source(self, data):
        return ("generated: passkey retrieval (Mohtashami & Jaggi 2023), contexts " + ",".join(map(str, self.contexts))
                + " tokens, depths " + ",".join(f"{d:g}" for d in self.depths) + " (seeded keys)")

    def load(self, data, limit, seed):
        """One sample per (context, depth, i): ``samples`` per cell when set, else the default capped by ``limit``.
        The prompts are built in ``prepare`` (they depend on the tokenizer)."""
        n = self.per_cell = self.samples or min(limit or self.default_samples, self.default_samples)
        out = []
        for c in self.contexts:
            for d in self.depths:
                for i in range(n):
                    out.append(Sample(len(out), [], "", pass_key(seed, c, d, i), {"context": c, "depth": d}))
        return out

    def prepare(self, samples, tokenizer, chat, max_prompt_tokens):
        self.skipped = sorted({s.meta["context"] for s in samples if max_prompt_tokens is not None
                               and s.meta["context"] > max_prompt_tokens})
        out = []
        for s in samples:
            if s.meta["context"] in self.skipped:
                continue
            r = render(tokenizer, chat, s.meta["context"], s.meta["depth"], s.target)
            meta = {**s.meta, **{k: r[k] for k in ("prompt_tokens", "needle_token", "depth_tokens")}}
            out.append(Sample(s.index, [{"role": "user", "content": r["text"]}], r["text"], s.target, meta))
        return out

    def score(self, samples, outputs, chat, sandbox=None):
        return [{"index": s.index, "correct": first_number(o) == s.target, "extracted": first_number(o),
                 "target": s.target, **s.meta} for s, o in zip(samples, outputs)]

    def rows(self, row, records):
        """The overall row, then one per context (``exact_match@<context>``) with its depths."""
        by_context = defaultdict(list)
        for r in records:
            by_context[r["context"]].append(r)
        row["details"].update({"contexts": {str(c): _cell(rs) for c, rs in sorted(by_context.items())},
                               "depths": {f"{d:g}": _cell([r for r in records if r["depth"] == d])
                                          for d in self.depths},
                               "samples_per_cell": self.per_cell, "skipped_contexts": self.skipped})
        out = [row]
        for c, rs in sorted(by_context.items()):
            score, se = accuracy(rs)
            out.append({"task": self.name, "n": len(rs), "metric": f"{self.metric}@{c}", "score": score,
                        "stderr": se, "ci95": accuracy_interval(rs), "tokens_per_second": None,
                        "source": row["source"], "context": c, "chat": row.get("chat"),
                        "details": {"depths": {f"{d:g}": _cell([r for r in rs if r["depth"] == d])
                                               for d in self.depths},
                                    "prompt_tokens": [min(r["prompt_tokens"] for r in rs),
                                                      max(r["prompt_tokens"] for r in rs)]}})
        return out

    def figures(self, out: Path, label: str, rows: list[dict], write: bool = True) -> list[Path]:
        cells = {int(c): {float(d): v for d, v in r["details"]["depths"].items()}
                 for r in rows if r.get("context") is not None for c in [r["context"]]}
        if not cells:
            return []
        path = Path(out) / f"passkey_{safe_name(label)}.png"
        if write:
            passkey_heatmap(cells, path, f"passkey retrieval: {label} (exact match per context and depth)")
        rows[0]["details"]["heatmap"] = path.name
        return [path]


def _cell(records: list[dict]) -> dict:
    k = sum(bool(r["correct"]) for r in records)
    return {"n": len(records), "correct": k, "score": k / len(records) if records else None,
            "ci95": accuracy_interval(records)}


__all__ = ["CONTEXTS", "DEPTHS", "PasskeyTask", "build_text", "first_number", "pass_key", "render"]
