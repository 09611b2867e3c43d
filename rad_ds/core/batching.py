"""Batches of token sequences of different lengths: the one pad-id rule, left-padded batches, length-sorted
batching. Every builder of a padded batch (the packed data, evaluation, the corpus' teacher answers, on-policy
generation, the study's held-out prompts) reads these, so they agree on what a pad token is."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_id(tokenizer) -> int:
    """The id a padded position holds: the tokenizer's ``pad_token_id``; else the smallest of its ``eos_token_id``
    (one id, or a list in some tokenizers); else 0.

    A pad position is never read (left padding is masked, right padding comes after every real token of its
    row), so any id would do: the rule only has to be one. It reads the tokenizer alone because the packed data
    is built, and cached under the tokenizer's fingerprint, where no model exists; the smallest EOS id, not the
    first, so that a list's order cannot change it (for an HF tokenizer ``eos_token_id`` is one id)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else [int(e) for e in (eos or ())]
    return min(ids) if ids else 0


def left_padded(seqs: Sequence, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(seqs), longest) int64: each sequence (1-D ids: a tensor or a list) right
    -aligned, ``pad`` before it and mask 0 there, so every row's last token is in the last column."""
    rows = [torch.as_tensor(s, dtype=torch.long).view(-1) for s in seqs]
    width = max((r.numel() for r in rows), default=0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r.numel():
            ids[i, width - r.numel():] = r
            mask[i, width - r.numel():] = 1
    return ids, mask


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties by index: the same batches every run);
    with ``max_tokens``, a batch also holds at most that many padded tokens (its first, longest item times its
    size; an item longer than that alone goes in a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is None or len(b) >= batch_size or (max_tokens and (len(b) + 1) * lengths[b[0]] > max_tokens):
            batches.append([i])
        else:
            b.append(i)
    return batches


__all__ = ["left_padded", "length_sorted_batches", "pad_id"]
