"""Calibration tokens for the weight-reading placements (``cosine``, ``kl_probe``): the first documents of a
training file, tokenised the way distillation tokenises them (chat template for ``messages`` records, EOS after
plain text), each cut to ``max_tokens``. One sequence per document, so every token is a real one."""

from __future__ import annotations

import torch

from rad_ds.data.sources import load_records
from rad_ds.data.tokenization import tokenize_records

from .choice import SelectionError

N_SEQUENCES = 16
MAX_TOKENS = 256


def calibration_tokens(path: str, tokenizer, n: int = N_SEQUENCES, max_tokens: int = MAX_TOKENS,
                       fmt: str = "auto", split: str = "train", text_field: str = "text",
                       messages_field: str = "messages") -> list[torch.Tensor]:
    """Token ids (1-D int64) of the first ``n`` usable documents of ``path``, each at most ``max_tokens`` long."""
    if n < 1 or max_tokens < 2:
        raise SelectionError(f"calibration: n={n} and max_tokens={max_tokens} must be >= 1 and >= 2")
    records = load_records(path, fmt, split, text_field, messages_field, max_documents=max(4 * n, 64))
    docs = tokenize_records(records, tokenizer, add_eos=True, mask_prompt=False, min_tokens=2, num_proc=1)
    out = [torch.as_tensor(ids[:max_tokens], dtype=torch.long) for ids, _ in docs[:n]]
    if not out:
        raise SelectionError(f"calibration: {path} holds no document of 2 or more tokens; give other data")
    return out


__all__ = ["MAX_TOKENS", "N_SEQUENCES", "calibration_tokens"]
