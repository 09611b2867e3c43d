"""Pack tokenised documents into fixed-length rows of ``seq_len`` tokens, with document boundaries.

``greedy``: best-fit decreasing. A document is never cut at a row boundary unless it is longer than
``seq_len``: then ``long_documents="split"`` cuts it into ``seq_len`` pieces (the last piece packed like
any document) and ``"truncate"`` keeps its first ``seq_len`` tokens. Within a row documents follow each
other, the prediction across a document boundary is masked out of the logit losses (``target``), and
the rest of the row is padding (``token`` = 0, masked everywhere). ``none`` puts each document (piece)
in a row of its own.

``position_ids`` mark the documents in transformers' convention: they restart at 0 at the start of
every document (or piece) of a row and count up inside it; padding continues the last document's
count. A row holding one document has no restart (plain ``0..seq_len-1``), so the model keeps its
plain causal path; rows with restarts get block-diagonal attention and Mamba2 state resets.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

LONG_DOCUMENTS = ("split", "truncate")


@dataclass
class Packed:
    input_ids: np.ndarray  # (n, seq_len) int32
    target: np.ndarray  # (n, seq_len) uint8: the prediction at this position counts in the logit losses
    token: np.ndarray  # (n, seq_len) uint8: a real token (not padding)
    position_ids: np.ndarray  # (n, seq_len) int32: 0 at every document start, padding continues the count
    n_documents: int  # documents packed (after dropping unusable ones)
    n_split: int  # documents longer than seq_len, split into pieces
    n_truncated: int = 0  # documents longer than seq_len, cut to their first seq_len tokens
    n_pieces_dropped: int = 0  # pieces (or truncated documents) left without a counted position

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def arrays(self) -> dict:
        meta = [self.n_documents, self.n_split, self.n_truncated, self.n_pieces_dropped]
        return {"input_ids": self.input_ids, "target": self.target, "token": self.token,
                "position_ids": self.position_ids, "meta": np.asarray(meta, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, a) -> Packed:
        meta = [int(x) for x in a["meta"]] + [0, 0]
        return cls(a["input_ids"], a["target"], a["token"], a["position_ids"], *meta[:4])


@dataclass
class Documents:
    """Tokenised documents as flat arrays: document ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # (total,) int32
    target: np.ndarray  # (total,) uint8
    offsets: np.ndarray  # (n + 1,) int64
    stats: dict = field(default_factory=dict)  # counts of how they were made (read, dropped, ...)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.target[a:b]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_list(cls, docs) -> Documents:
        """From a list of ``(ids, target)`` pairs."""
        lengths = np.asarray([len(ids) for ids, _ in docs], dtype=np.int64)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(docs):
            ids = np.concatenate([np.asarray(i) for i, _ in docs]).astype(np.int32, copy=False)
            target = np.concatenate([np.asarray(t) for _, t in docs]).astype(np.uint8, copy=False)
        else:
            ids, target = np.zeros(0, np.int32), np.zeros(0, np.uint8)
        return cls(ids, target, offsets)


def _pieces(docs: Documents, seq_len: int, long_documents: str):
    """(start, length) into the flat arrays of every piece, the pieces' targets (a copy of the flat
    targets with each cut's last counted position removed), and counts."""
    starts, lengths = docs.offsets[:-1], docs.lengths
    long = lengths > seq_len
    target = docs.target.copy()
    if long_documents == "truncate":
        p_start, p_len = starts.copy(), np.minimum(lengths, seq_len)
        cut_end = p_start[long] + seq_len  # its next token is gone
        target[cut_end - 1] = 0
    elif long_documents == "split":
        n_pieces = np.maximum(-(-lengths // seq_len), 1)
        doc = np.repeat(np.arange(len(lengths)), n_pieces)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        k = np.arange(len(doc)) - first  # piece k of its document
        p_start = starts[doc] + k * seq_len
        p_len = np.minimum(lengths[doc] - k * seq_len, seq_len)
        not_last = k < n_pieces[doc] - 1
        target[(p_start + p_len - 1)[not_last]] = 0  # its next token starts the next piece, in another row
    else:
        raise ValueError(f"long_documents {long_documents!r}: use {' or '.join(LONG_DOCUMENTS)}")
    from_long = (lengths > seq_len)[doc] if long_documents == "split" else long
    drop = np.zeros(len(p_start), dtype=bool)
    cut = np.nonzero(from_long & (p_len > 0))[0]
    if len(cut):  # a cut may leave a piece nothing to learn (documents that fit are kept as given)
        bounds = np.stack([p_start[cut], p_start[cut] + p_len[cut]], axis=1).ravel()
        counted = np.add.reduceat(np.append(target, 0), bounds)[::2]
        drop[cut] = counted == 0
    keep = ~drop & (p_len > 0)
    return p_start[keep], p_len[keep], target, int(long.sum()), int(drop.sum())


def _best_fit_decreasing(lengths, capacity: int) -> np.ndarray:
    """The bin of each item: items, longest first (ties: lowest index), each go to the fullest bin they
    fit in (the smallest remaining capacity >= the item; ties: the lowest bin id), else a new bin.

    O(n log capacity): a Fenwick tree over remaining capacities 1..capacity counts the open bins at each,
    so the smallest capacity >= n that holds a bin is a prefix-count query and a descent; each capacity
    keeps a min-heap of its bin ids."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    tree = [0] * (capacity + 1)  # Fenwick tree of bin counts by remaining capacity
    heaps: list[list[int]] = [[] for _ in range(capacity + 1)]
    top = 1 << capacity.bit_length()
    total = 0
    n_bins = 0
    bin_of = np.empty(len(lengths), dtype=np.int64)

    def add(c: int, d: int) -> None:
        while c <= capacity:
            tree[c] += d
            c += c & -c

    for i, n in zip(order.tolist(), lengths[order].tolist()):
        found = 0
        if total:
            below, c = 0, n - 1  # bins with remaining capacity < n
            while c > 0:
                below += tree[c]
                c -= c & -c
            if below < total:  # descend to the (below + 1)-th bin in capacity order
                pos, k, step = 0, below + 1, top
                while step:
                    nxt = pos + step
                    if nxt <= capacity and tree[nxt] < k:
                        pos, k = nxt, k - tree[nxt]
                    step >>= 1
                found = pos + 1
        if found:
            b = heapq.heappop(heaps[found])
            add(found, -1)
            total -= 1
            rem = found - n
        else:
            b, n_bins, rem = n_bins, n_bins + 1, capacity - n
        bin_of[i] = b
        if rem > 0:
            heapq.heappush(heaps[rem], b)
            add(rem, 1)
            total += 1
    return bin_of


def pack_documents(docs, seq_len: int, mode: str = "greedy", pad_id: int = 0,
                   long_documents: str = "split") -> Packed:
    """``docs``: :class:`Documents` or a list of ``(ids, target)`` arrays (as from
    :func:`rad_ds.data.tokenization.tokenize_records`), in dataset order."""
    if not isinstance(docs, Documents):
        docs = Documents.from_list(docs)
    p_start, p_len, p_target, n_long, n_dropped = _pieces(docs, seq_len, long_documents)
    if mode == "greedy":
        bin_of = _best_fit_decreasing(p_len, seq_len)
    elif mode == "none":
        bin_of = np.arange(len(p_len))
    else:
        raise ValueError(f"packing mode {mode!r}: use greedy or none")
    n = int(bin_of.max()) + 1 if len(bin_of) else 0
    input_ids = np.full(n * seq_len, pad_id, dtype=np.int32)
    target = np.zeros(n * seq_len, dtype=np.uint8)
    token = np.zeros(n * seq_len, dtype=np.uint8)
    position_ids = np.empty(n * seq_len, dtype=np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    # rows in bin order, pieces in dataset order inside a row; one slice copy per piece (faster than
    # building a per-token index)
    order = np.lexsort((np.arange(len(bin_of)), bin_of))
    b_sorted, len_sorted = bin_of[order], p_len[order]
    cum = np.cumsum(len_sorted) - len_sorted
    col = cum - cum[np.searchsorted(b_sorted, b_sorted)]  # offset inside the row
    ids, tgt = docs.ids, p_target
    for d, s, ln in zip((b_sorted * seq_len + col).tolist(), p_start[order].tolist(), len_sorted.tolist()):
        input_ids[d:d + ln] = ids[s:s + ln]
        target[d:d + ln] = tgt[s:s + ln]
        token[d:d + ln] = 1
        position_ids[d:d + ln] = ramp[:ln]
    # padding continues the count of the row's last document
    last = np.searchsorted(b_sorted, np.arange(n), side="right") - 1  # each row's last piece (sorted order)
    fill, last_col = col[last] + len_sorted[last], col[last]
    for r in np.nonzero(fill < seq_len)[0].tolist():
        f, c = int(fill[r]), int(last_col[r])
        position_ids[r * seq_len + f:(r + 1) * seq_len] = ramp[f - c:seq_len - c]
    shape = (n, seq_len)
    input_ids, target, token, position_ids = (a.reshape(shape) for a in (input_ids, target, token, position_ids))
    return Packed(input_ids, target, token, position_ids,
                  len(docs), n_long if long_documents == "split" else 0, n_long if long_documents == "truncate" else 0,
                  n_dropped)


__all__ = ["LONG_DOCUMENTS", "Documents", "Packed", "pack_documents"]
