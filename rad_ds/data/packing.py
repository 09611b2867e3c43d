"""Pack tokenised documents into fixed-length rows of ``seq_len`` tokens.

``greedy``: best-fit decreasing. A document is never cut at a row boundary unless it is longer than
``seq_len`` (then it is split into ``seq_len`` pieces, the last piece packed like any document). Within a
row documents follow each other, the prediction across a document boundary is masked out of the logit
losses (``target``), and the rest of the row is padding (``token`` = 0, masked everywhere). Rows are
right-padded, so with causal attention and a causal scan a real token never sees padding: the model
needs no attention mask. A document does see the earlier documents of its row as context, as in GPT
pretraining; ``none`` puts each document (piece) in a row of its own when that matters.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Packed:
    input_ids: np.ndarray  # (n, seq_len) int32
    target: np.ndarray  # (n, seq_len) uint8: the prediction at this position counts in the logit losses
    token: np.ndarray  # (n, seq_len) uint8: a real token (not padding)
    n_documents: int
    n_split: int  # documents longer than seq_len, split into pieces

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def arrays(self) -> dict:
        return {"input_ids": self.input_ids, "target": self.target, "token": self.token,
                "meta": np.asarray([self.n_documents, self.n_split], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, a) -> Packed:
        meta = a["meta"]
        return cls(a["input_ids"], a["target"], a["token"], int(meta[0]), int(meta[1]))


def _pieces(docs, seq_len: int):
    pieces, n_split = [], 0
    for ids, target in docs:
        if len(ids) <= seq_len:
            pieces.append((ids, target))
            continue
        n_split += 1
        for s in range(0, len(ids), seq_len):
            ids_p, tgt_p = ids[s:s + seq_len], target[s:s + seq_len].copy()
            if s + seq_len < len(ids):
                tgt_p[-1] = 0  # its next token starts the next piece, in another row
            if tgt_p.any():
                pieces.append((ids_p, tgt_p))
    return pieces, n_split


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of piece indices: each piece, longest first, goes to the fullest bin it fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            if rem - n > 0:
                bisect.insort(free, (rem - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    for b in bins:  # dataset order inside a row
        b.sort()
    return bins


def pack_documents(docs, seq_len: int, mode: str = "greedy", pad_id: int = 0) -> Packed:
    """``docs``: list of ``(ids, target)`` arrays from :func:`rad_ds.data.tokenization.tokenize_records`."""
    pieces, n_split = _pieces(docs, seq_len)
    if mode == "greedy":
        bins = _best_fit_decreasing([len(p[0]) for p in pieces], seq_len)
    elif mode == "none":
        bins = [[i] for i in range(len(pieces))]
    else:
        raise ValueError(f"packing mode {mode!r}: use greedy or none")
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    target = np.zeros((n, seq_len), dtype=np.uint8)
    token = np.zeros((n, seq_len), dtype=np.uint8)
    for r, b in enumerate(bins):
        pos = 0
        for i in b:
            ids, tgt = pieces[i]
            input_ids[r, pos:pos + len(ids)] = ids
            target[r, pos:pos + len(ids)] = tgt
            token[r, pos:pos + len(ids)] = 1
            pos += len(ids)
    return Packed(input_ids, target, token, len(docs), n_split)


__all__ = ["Packed", "pack_documents"]
