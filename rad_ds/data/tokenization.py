"""Records -> token ids and a per-position target mask.

``target[t] = 1`` when the prediction made at position ``t`` (of token ``t + 1``) counts in the logit
losses. Plain text: every position but the last of a document (whose next token belongs to another
document). Chat: the conversation is rendered with the tokenizer's chat template; with ``mask_prompt``
only positions whose next token belongs to an assistant turn count, so the student is distilled on
answers, not on prompts. The assistant spans come from rendering each conversation prefix (the
template must render a prefix as a prefix of the whole, which every common template does; checked).
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from .sources import DataError

logger = logging.getLogger(__name__)


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


def _text_docs(texts, tok, add_eos: bool):
    eos = tok.eos_token_id
    enc = tok(list(texts), add_special_tokens=True)["input_ids"]
    out = []
    for ids in enc:
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        ids = np.asarray(ids, dtype=np.int64)
        target = np.ones(len(ids), dtype=np.uint8)
        if len(ids):
            target[-1] = 0
        out.append((ids, target))
    return out


def _check_messages(msgs, index: int, source: str):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{source} record {index}: messages must be a non-empty list of {{role, content}}")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{source} record {index}: every message needs 'role' and 'content', got {m!r:.80}")


def _chat_doc(msgs, tok, mask_prompt: bool, index: int, source: str):
    _check_messages(msgs, index, source)
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans = []
    if mask_prompt:
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            end = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise DataError(
                    f"{source} record {index}: the chat template does not render a conversation prefix as a "
                    "prefix of the whole, so assistant tokens cannot be located; set data.mask_prompt=false"
                )
            spans.append((len(start), len(end)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=mask_prompt)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    if mask_prompt:
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        is_answer = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            is_answer |= (starts >= a) & (starts < b)
        target = np.zeros(len(ids), dtype=np.uint8)
        target[:-1] = is_answer[1:]
    else:
        target = np.ones(len(ids), dtype=np.uint8)
        if len(ids):
            target[-1] = 0
    return ids, target


def tokenize_records(records, tok, add_eos: bool = True, mask_prompt: bool = True, min_tokens: int = 2,
                     batch_size: int = 1000):
    """``Records`` -> list of ``(ids int64, target uint8)`` per document, in dataset order.

    Documents shorter than ``min_tokens`` or without a single counted position are dropped."""
    ds, source = records.dataset, records.source
    if records.kind == "messages":
        if not getattr(tok, "chat_template", None):
            raise DataError(
                f"data.path {source} holds chat messages but the tokenizer has no chat template; give the data "
                "as plain text (data.text_field) or use a model whose tokenizer has one"
            )
        if mask_prompt and not getattr(tok, "is_fast", False):
            raise DataError("data.mask_prompt needs a fast tokenizer (offsets); set data.mask_prompt=false")
    docs = []
    index = 0
    for batch in ds.iter(batch_size=batch_size):
        values = batch[records.field]
        if records.kind == "text":
            bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
            if bad:
                raise DataError(f"{source} record {index + bad[0]}: {records.field!r} must be a string, got "
                                f"{type(values[bad[0]]).__name__}")
            docs.extend(_text_docs(values, tok, add_eos))
        else:
            for j, msgs in enumerate(values):
                docs.append(_chat_doc(msgs, tok, mask_prompt, index + j, source))
        index += len(values)
    kept = [d for d in docs if len(d[0]) >= max(min_tokens, 1) and d[1].any()]
    if len(kept) < len(docs):
        logger.info("dropped %d of %d documents (shorter than %d tokens or nothing to learn)",
                    len(docs) - len(kept), len(docs), min_tokens)
    if not kept:
        raise DataError(
            f"data.path {source}: no usable documents ({len(docs)} read, all shorter than data.min_tokens="
            f"{min_tokens} or without assistant tokens); add data"
        )
    return kept


__all__ = ["tokenize_records", "tokenizer_fingerprint"]
