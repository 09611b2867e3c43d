"""The diagnosis' documents: windows of the user's data (the distillation data), tokenised the way distillation
tokenises them, whose counted positions the skip-drafts are scored on, teacher-forced.

Documents are shuffled with the seed; each gives one window of at most ``seq_len`` tokens (a seeded offset inside a
longer document, so long files are not only read from their first lines). Windows are taken until the search's
``tokens`` counted positions are reached; the held-out windows come from the documents after them, so the two
sets share no document. Counted positions are those distillation trains on (assistant tokens of a chat, every
token of plain text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from rad_ds.data.sources import DataError, load_records
from rad_ds.data.tokenization import tokenize_records


@dataclass
class DocumentWindows:
    search: list[tuple[torch.Tensor, torch.Tensor]]  # (ids, counted) per window
    held_out: list[tuple[torch.Tensor, torch.Tensor]]
    documents: int  # usable documents in the data

    @staticmethod
    def positions(windows) -> int:
        return int(sum(int(c[:-1].sum()) for _, c in windows))


def window(ids: np.ndarray, target: np.ndarray, seq_len: int, rng: random.Random):
    """One window of at most ``seq_len`` tokens of a document at a seeded offset: (ids, counted positions)."""
    n = len(ids)
    a = rng.randrange(0, n - seq_len + 1) if n > seq_len else 0
    ids, target = ids[a:a + seq_len], target[a:a + seq_len].copy()
    target[-1] = 0  # the window's last token has no successor inside it
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(target.astype(bool))


def document_windows(path: str, tokenizer, tokens: int, held_out_tokens: int = 0, seq_len: int = 256,
                     seed: int = 0, fmt: str = "auto", text_field: str = "text",
                     messages_field: str = "messages") -> DocumentWindows:
    """Windows of ``path``'s documents: ``tokens`` counted positions for the search, then ``held_out_tokens`` more
    from other documents (fewer when the data runs out; the caller reports it)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; the diagnosis needs one to read data")
    records = load_records(path, fmt, "train", text_field, messages_field)
    docs = tokenize_records(records, tokenizer, add_eos=True, mask_prompt=True, min_tokens=2, num_proc=1)
    order = list(range(len(docs)))
    rng = random.Random(seed)
    rng.shuffle(order)
    search, held, got, got_held = [], [], 0, 0
    for j in order:
        ids, target = docs[j]
        w = window(ids, target, seq_len, rng)
        n = int(w[1].sum())
        if n == 0:
            continue
        if got < tokens:
            search.append(w)
            got += n
        elif got_held < held_out_tokens:
            held.append(w)
            got_held += n
        else:
            break
    if not search:
        raise DataError(f"diagnose data {path}: no document with a counted position; give other data")
    return DocumentWindows(search, held, len(docs))


__all__ = ["DocumentWindows", "document_windows", "window"]
