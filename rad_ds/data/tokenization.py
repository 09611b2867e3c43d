"""Records -> token ids and a per-position target mask, through ``datasets.Dataset.map``.

``target[t] = 1`` when the prediction made at position ``t`` (of token ``t + 1``) counts in the logit
losses. Plain text: every position but the last of a document (whose next token belongs to another
document). Chat: the conversation is rendered with the tokenizer's chat template; with ``mask_prompt``
only positions whose next token belongs to an assistant turn count, so the student is distilled on
answers, not on prompts (the spans: :mod:`rad_ds.data.chat_mask`, one render per conversation).

The map is batched (tokenizer calls over 1000 records), runs in ``num_proc`` processes, and is cached
by datasets next to the source's Arrow files (``HF_DATASETS_CACHE``) under a fingerprint of the source,
the tokenizer (with its chat template) and the settings that change its output, so a second run over
the same data, with any ``seq_len`` or packing, skips tokenisation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os

import numpy as np
import tokenizers

from . import chat_mask
from .packing import Documents
from .sources import DataError

logger = logging.getLogger(__name__)

TOKENIZE_VERSION = 2  # bump when what the map writes changes: old cache files are then not reused
MIN_RECORDS_PER_PROC = 1000  # fewer records than this per process: starting the processes costs more


def tokenizer_fingerprint(tok) -> str:
    """A short hash of what decides the token ids: the vocabulary, merges, normaliser and chat template."""
    h = hashlib.sha1()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    h.update(str((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)).encode())
    return h.hexdigest()[:16]


def resolve_num_proc(num_proc: int | None, n_records: int) -> int:
    """Processes for ``n_records``: ``num_proc`` (default: the CPUs this process may use, at most 8), at
    most one per :data:`MIN_RECORDS_PER_PROC` records; 1 runs in this process."""
    if num_proc is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_proc = min(cpus, 8)
    return max(1, min(int(num_proc), n_records // MIN_RECORDS_PER_PROC))


def _check_messages(msgs, index: int, source: str):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{source} record {index}: messages must be a non-empty list of {{role, content}}")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{source} record {index}: every message needs 'role' and 'content', got {m!r:.80}")


def _flat(lists, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Ragged lists -> (flat values, offsets)."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(offsets[-1])), offsets


def _backend(tok):
    """The Rust tokenizer, when calling it directly gives what ``tok(texts)`` gives (no truncation, padding
    or special-token splitting configured); ``None`` otherwise. It skips the conversion of every
    encoding into Python lists of all its fields, which costs about as much as the tokenisation."""
    b = getattr(tok, "_tokenizer", None)
    if not getattr(tok, "is_fast", False) or b is None or not hasattr(b, "encode_batch_fast"):
        return None
    if b.truncation is not None or b.padding is not None or getattr(tok, "split_special_tokens", False):
        return None
    return None if getattr(b, "encode_special_tokens", False) else b


def _encode(tok, texts: list[str], add_special_tokens: bool, offsets: bool = False):
    """(ids per text, start character of every token, flat; or None)."""
    b = _backend(tok)
    if b is None:
        enc = tok(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
        starts = [s for o in enc["offset_mapping"] for s, _ in o] if offsets else None
        return enc["input_ids"], starts
    if not offsets:
        return [e.ids for e in b.encode_batch_fast(texts, add_special_tokens=add_special_tokens)], None
    encs = b.encode_batch(texts, add_special_tokens=add_special_tokens)
    return [e.ids for e in encs], [s for e in encs for s, _ in e.offsets]


def _shift_left(is_answer: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``target[t] = is_answer[t + 1]`` inside each document, 0 at each document's last position."""
    target = np.zeros(len(is_answer), dtype=np.uint8)
    target[:-1] = is_answer[1:]
    ends = offsets[1:][offsets[1:] > offsets[:-1]] - 1
    target[ends] = 0
    return target


def _all_but_last(offsets: np.ndarray) -> np.ndarray:
    return _shift_left(np.ones(int(offsets[-1]), dtype=np.uint8), offsets)


def _answer_tokens(starts: np.ndarray, offsets: np.ndarray, spans: list, text_lengths: list[int]) -> np.ndarray:
    """Tokens whose first character lies in one of their conversation's spans (all conversations of a
    batch at once: characters are numbered across the batch)."""
    base = np.zeros(len(text_lengths), dtype=np.int64)
    np.cumsum(np.asarray(text_lengths[:-1], dtype=np.int64) + 1, out=base[1:])
    pos = starts + np.repeat(base, np.diff(offsets))
    flat = [(base[k] + a, base[k] + b) for k, sp in enumerate(spans) for a, b in sp]
    if not flat:
        return np.zeros(len(starts), dtype=bool)
    lo, hi = (np.asarray(x, dtype=np.int64) for x in zip(*flat))
    k = np.searchsorted(lo, pos, side="right") - 1
    return (k >= 0) & (pos < hi[np.maximum(k, 0)])


def encode_batch(values, indices, *, tok, kind: str, field: str, source: str, add_eos: bool, mask_prompt: bool,
                 shape: chat_mask.TurnShape | None, generation: bool):
    """The map function: a batch of records -> ``input_ids``, ``target`` (lists) and ``slow`` (1 where the
    answer spans needed the per-prefix renders)."""
    import pyarrow as pa

    slow = np.zeros(len(values), dtype=np.uint8)
    if kind == "text":
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise DataError(f"{source} record {indices[bad[0]]}: {field!r} must be a string, got "
                            f"{type(values[bad[0]]).__name__}")
        enc, _ = _encode(tok, list(values), add_special_tokens=True)
        eos = tok.eos_token_id
        if add_eos and eos is not None:
            enc = [ids if ids and ids[-1] == eos else ids + [eos] for ids in enc]
        ids, offsets = _flat(enc, np.int32)
        target = _all_but_last(offsets)
    else:
        convs = []
        for msgs, index in zip(values, indices):
            _check_messages(msgs, index, source)
            convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        if mask_prompt and generation:
            out = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, offsets = _flat(out["input_ids"], np.int32)
            is_answer, _ = _flat(out["assistant_masks"], np.uint8)
            target = _shift_left(is_answer, offsets)
        else:
            texts = chat_mask.render(tok, convs)
            if not mask_prompt:
                ids, offsets = _flat(_encode(tok, texts, add_special_tokens=False)[0], np.int32)
                target = _all_but_last(offsets)
            else:
                spans = []
                for k, (msgs, text) in enumerate(zip(convs, texts)):
                    sp = chat_mask.locate_spans(msgs, text, shape) if shape is not None else None
                    if sp is None:
                        sp, slow[k] = chat_mask.prefix_spans(msgs, tok, text), 1
                    if sp is None:
                        raise DataError(
                            f"{source} record {indices[k]}: the chat template does not render a conversation "
                            "prefix as a prefix of the whole, so assistant tokens cannot be located; set "
                            "data.mask_prompt=false"
                        )
                    spans.append(sp)
                enc, starts = _encode(tok, texts, add_special_tokens=False, offsets=True)
                ids, offsets = _flat(enc, np.int32)
                starts = np.asarray(starts, dtype=np.int64)
                target = _shift_left(_answer_tokens(starts, offsets, spans, [len(t) for t in texts]), offsets)
    off32 = pa.array(offsets.astype(np.int32), type=pa.int32())  # a batch is far below 2**31 tokens
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(off32, pa.array(ids, type=pa.int32())),
        "target": pa.ListArray.from_arrays(off32, pa.array(target, type=pa.uint8())),
        "slow": pa.array(slow, type=pa.uint8()),
    })


def _check_tokenizer(records, tok, mask_prompt: bool) -> None:
    if records.kind != "messages":
        return
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"data.path {records.source} holds chat messages but the tokenizer has no chat template; give the data "
            "as plain text (data.text_field) or use a model whose tokenizer has one"
        )
    if mask_prompt and not getattr(tok, "is_fast", False):
        raise DataError("data.mask_prompt needs a fast tokenizer (offsets); set data.mask_prompt=false")


def map_fingerprint(records, tok, add_eos: bool, mask_prompt: bool, shape, generation: bool) -> str:
    """What decides the map's output: the source dataset (datasets' own fingerprint of the files and
    any selection), the tokenizer with its chat template (and the library versions that render and
    tokenise), and the settings. ``seq_len`` and packing act after the map, so they are not in it."""
    import transformers  # deferred: ~1 s, a version stamp; rad-corpus --help imports this module

    blob = json.dumps({
        "source": records.dataset._fingerprint, "tok": tokenizer_fingerprint(tok), "kind": records.kind,
        "libs": [transformers.__version__, tokenizers.__version__],
        "field": records.field, "add_eos": add_eos, "mask_prompt": mask_prompt, "generation": generation,
        "shape": None if shape is None else [shape.header, shape.suffix], "version": TOKENIZE_VERSION,
    }, sort_keys=True)
    return "rad_ds_" + hashlib.sha1(blob.encode()).hexdigest()


def _column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of an Arrow table -> (flat values, int64 offsets from 0), chunk by chunk (a column
    of more than 2**31 values does not fit one int32-offset array)."""
    values, offsets, base = [], [np.zeros(1, dtype=np.int64)], 0
    for chunk in table.column(name).chunks:
        off = np.asarray(chunk.offsets, dtype=np.int64)
        values.append(np.asarray(chunk.flatten()))
        offsets.append(off[1:] - off[0] + base)
        base += int(off[-1] - off[0])
    flat = np.concatenate(values) if values else np.zeros(0)
    return flat, np.concatenate(offsets)


def tokenize_documents(records, tok, add_eos: bool = True, mask_prompt: bool = True, min_tokens: int = 2,
                       num_proc: int | None = None, batch_size: int = 1000) -> Documents:
    """``Records`` -> :class:`Documents` in dataset order, without the unusable ones: documents shorter
    than ``min_tokens`` (or empty) and those without a single counted position are dropped and
    counted in ``stats`` (``read``, ``empty``, ``too_short``, ``no_target``, ``slow_masks``)."""
    ds, source = records.dataset, records.source
    _check_tokenizer(records, tok, mask_prompt)
    generation = records.kind == "messages" and mask_prompt and chat_mask.has_generation_blocks(tok)
    shape = None
    if records.kind == "messages" and mask_prompt and not generation:
        shape = chat_mask.learn_turn_shape(tok)
        if shape is None:
            logger.warning("the chat template of this tokenizer has no single assistant-turn shape: answer spans "
                           "come from rendering every conversation prefix (slower)")
    procs = resolve_num_proc(num_proc, len(ds))
    mapped = ds.map(
        encode_batch, batched=True, batch_size=batch_size, with_indices=True, input_columns=[records.field],
        remove_columns=ds.column_names, num_proc=procs if procs > 1 else None,
        new_fingerprint=map_fingerprint(records, tok, add_eos, mask_prompt, shape, generation),
        fn_kwargs={"tok": tok, "kind": records.kind, "field": records.field, "source": source, "add_eos": add_eos,
                   "mask_prompt": mask_prompt, "shape": shape, "generation": generation},
        desc="rad-ds: tokenise",
    )
    table = mapped.data.table
    ids, offsets = _column(table, "input_ids")
    target, _ = _column(table, "target")
    slow = int(np.asarray(table.column("slow")).sum())
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    counted = np.zeros(len(lengths), dtype=np.int64)
    if nonempty.any():
        counted[nonempty] = np.add.reduceat(target, offsets[:-1][nonempty], dtype=np.int64)
    keep = (lengths >= max(min_tokens, 1)) & (counted > 0)
    stats = {"read": len(lengths), "empty": int((~nonempty).sum()),
             "too_short": int((nonempty & (lengths < min_tokens)).sum()),
             "no_target": int(((lengths >= max(min_tokens, 1)) & (counted == 0)).sum()), "slow_masks": slow}
    if not keep.any():
        raise DataError(
            f"data.path {source}: no usable documents ({len(lengths)} read, all shorter than data.min_tokens="
            f"{min_tokens} or without assistant tokens); add data"
        )
    if not keep.all():
        per_token = np.repeat(keep, lengths)
        ids, target = ids[per_token], target[per_token]
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
    return Documents(np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(target, dtype=np.uint8),
                     offsets, stats)


def tokenize_records(records, tok, add_eos: bool = True, mask_prompt: bool = True, min_tokens: int = 2,
                     batch_size: int = 1000, num_proc: int | None = 1):
    """``Records`` -> list of ``(ids int64, target uint8)`` per usable document, in dataset order
    (:func:`tokenize_documents` as a list)."""
    docs = tokenize_documents(records, tok, add_eos, mask_prompt, min_tokens, num_proc, batch_size)
    dropped = docs.stats["read"] - len(docs)
    if dropped:
        logger.info("dropped %d of %d documents (%d empty, %d shorter than %d tokens, %d with nothing to learn)",
                    dropped, docs.stats["read"], docs.stats["empty"], docs.stats["too_short"], min_tokens,
                    docs.stats["no_target"])
    return [(ids.astype(np.int64), tgt) for ids, tgt in docs]


__all__ = ["encode_batch", "resolve_num_proc", "tokenize_documents", "tokenize_records", "tokenizer_fingerprint"]
