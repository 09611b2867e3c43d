"""What rad-ds' data path computed before (rad_ds/data at e271e87): the definitions the fast paths are tested
against (tests/test_data.py) and the former path the data-prep benchmark times (benchmarks/data_prep.py)."""

from __future__ import annotations

import bisect

import numpy as np


def answer_target(tok, text: str, spans) -> tuple[np.ndarray, np.ndarray]:
    """(ids, target) of a rendered conversation: target[t] = 1 when token t + 1 starts inside an answer span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    is_answer = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        is_answer |= (starts >= a) & (starts < b)
    target = np.zeros(len(ids), dtype=np.uint8)
    target[:-1] = is_answer[1:]
    return ids, target


def reference_chat_doc(msgs, tok):
    """The per-prefix definition of the answer mask (rad-ds' former ``_chat_doc``, mask_prompt=True):
    two extra renders per assistant turn."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            start = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            end = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
            assert text.startswith(start) and text.startswith(end)
            spans.append((len(start), len(end)))
    return answer_target(tok, text, spans)


def reference_best_fit(lengths, capacity):
    """rad-ds' former best-fit decreasing: a sorted list of (remaining capacity, bin id), insort/pop."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
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
    return [sorted(b) for b in bins]


def reference_pieces(docs, seq_len):
    """Documents longer than a row cut into row-sized pieces (a cut piece's last target off); pieces with
    nothing to learn dropped."""
    pieces = []
    for ids, target in docs:
        if len(ids) <= seq_len:
            pieces.append((ids, target))
            continue
        for s in range(0, len(ids), seq_len):
            ids_p, tgt_p = ids[s:s + seq_len], target[s:s + seq_len].copy()
            if s + seq_len < len(ids):
                tgt_p[-1] = 0
            if tgt_p.any():
                pieces.append((ids_p, tgt_p))
    return pieces


def reference_rows(docs, seq_len, mode):
    """rad-ds' former packer: (ids, target) of every row before padding."""
    pieces = reference_pieces(docs, seq_len)
    bins = (reference_best_fit([len(p[0]) for p in pieces], seq_len) if mode == "greedy"
            else [[i] for i in range(len(pieces))])
    return [(np.concatenate([pieces[i][0] for i in b]), np.concatenate([pieces[i][1] for i in b])) for b in bins]
