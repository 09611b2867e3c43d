"""Data: loading and its errors, chat-template masks, packing invariants and document boundaries, the
resumable sampler, the build-once cache.

The fast paths are compared with references kept here: the per-prefix chat mask and the list-based
best-fit packer that rad-ds used before (``_reference_*``), and token-level oracles (unique ids per
document and position) for ``position_ids``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rad_ds.data import (
    DataError,
    DistillLoader,
    ResumableSampler,
    build_packed,
    load_records,
    pack_documents,
    tokenize_records,
)
from rad_ds.data.config import DataConfig
from tests.data_reference import reference_best_fit, reference_chat_doc, reference_rows
from tests.distill_helpers import CHATML, ROOT, byte_tokenizer, write_chat_jsonl, write_text_jsonl


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _docs(rng, n, lo=1, hi=40):
    out = []
    for k in range(n):
        ln = int(rng.integers(lo, hi))
        ids = np.arange(ln, dtype=np.int64) + 1000 * (k + 1)  # unique ids: document k, token i
        tgt = np.ones(ln, dtype=np.uint8)
        tgt[-1] = 0
        out.append((ids, tgt))
    return out


# -- loading -----------------------------------------------------------------------------------------


def test_jsonl_parquet_text_and_directory(tmp_path, tok):
    p = write_text_jsonl(tmp_path / "a.jsonl", n=5)
    recs = load_records(str(p))
    assert recs.kind == "text" and len(recs.dataset) == 5
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    assert load_records(str(tmp_path / "pq")).dataset[2]["text"] == rows[2]["text"]
    (tmp_path / "t.txt").write_text("first doc line one\nline two\n\nsecond doc\n\n\nthird doc\n")
    texts = load_records(str(tmp_path / "t.txt")).dataset["text"]
    assert [t.strip() for t in texts] == ["first doc line one\nline two", "second doc", "third doc"]
    chat = load_records(str(write_chat_jsonl(tmp_path / "c.jsonl", n=3)))
    assert chat.kind == "messages" and chat.field == "messages"


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken\n', "line 2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2: a record must be a JSON object"),
    ('{"body": "x"}\n', "expected 'text' (data.text_field) or 'messages'"),
    ("", "no records"),
])
def test_bad_files_name_the_problem(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_records(str(p))


def test_missing_unknown_and_corrupt_binary(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csvx").write_text("a")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(str(tmp_path / "x.csvx"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: could not be read"):
        load_records(str(tmp_path / "bad.parquet"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(str(tmp_path / "bin.jsonl"))


def test_bad_records_and_empty_after_filtering(tmp_path, tok):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match="record 0: every message needs 'role' and 'content'"):
        tokenize_records(load_records(str(p)), tok)
    p.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(DataError, match="record 0: 'text' must be a string"):
        tokenize_records(load_records(str(p)), tok)
    p.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match="no usable documents"):
        tokenize_records(load_records(str(p)), tok, min_tokens=10)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no chat template"):
        tokenize_records(load_records(str(p)), byte_tokenizer(chat_template=None))


# -- tokenisation and masks ------------------------------------------------------------------------------


def test_text_targets_and_eos(tmp_path, tok):
    p = write_text_jsonl(tmp_path / "a.jsonl", n=3)
    docs = tokenize_records(load_records(str(p)), tok, add_eos=True)
    texts = [json.loads(x)["text"] for x in p.read_text().splitlines()]
    for (ids, tgt), text in zip(docs, texts):
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == text
        assert tgt[:-1].all() and tgt[-1] == 0  # the EOS position would predict the next document


def test_chat_mask_selects_exactly_the_assistant_turns(tmp_path, tok):
    p = write_chat_jsonl(tmp_path / "c.jsonl", n=6, seed=3)
    recs = load_records(str(p))
    docs = tokenize_records(recs, tok, mask_prompt=True)
    for (ids, tgt), msgs in zip(docs, recs.dataset["messages"]):
        predicted = ids[1:][tgt[:-1].astype(bool)]  # the tokens whose prediction counts
        expected = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert tok.decode(predicted) == expected
        assert tgt[-1] == 0
    full = tokenize_records(recs, tok, mask_prompt=False)
    assert all(t[:-1].all() for _, t in full)


def test_chat_mask_with_the_real_smollm2_template(tmp_path):
    """SmolLM2's own template (it inserts a default system prompt): the mask is still exactly the answer."""
    from rad_ds.core.shared_cache import is_complete
    from rad_ds.models.conversion import cache_dir, load_tokenizer, smollm2_gguf

    d = cache_dir() / "smollm2-135m-instruct"
    if is_complete(d):
        real = load_tokenizer(d)
    else:
        try:
            src, f = smollm2_gguf()
        except FileNotFoundError as e:
            pytest.skip(str(e))
        real = load_tokenizer(src, gguf_file=f)
    p = tmp_path / "c.jsonl"
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."},
            {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ids, tgt), = tokenize_records(load_records(str(p)), real)
    predicted = real.decode(ids[1:][tgt[:-1].astype(bool)])
    assert predicted == "2+3 = 5.<|im_end|>\nYou're welcome.<|im_end|>\n"
    # one render per conversation = the per-prefix definition, token for token (BPE merges across the
    # span boundaries included), with and without a system prompt, over several turns
    from rad_ds.data.tokenization import tokenize_documents

    convs = _CONVERSATIONS + [[(r, c) for r, c in zip(["user", "assistant"] * 2, [m["content"] for m in msgs])]]
    recs = load_records(str(_write_conversations(tmp_path / "many.jsonl", convs)))
    docs = tokenize_documents(recs, real, min_tokens=1, num_proc=1)
    assert len(docs) == len(convs) and docs.stats["slow_masks"] == 0
    for (ids, tgt), msgs in zip(docs, recs.dataset["messages"]):
        ref_ids, ref_tgt = reference_chat_doc(msgs, real)
        assert np.array_equal(ids, ref_ids) and np.array_equal(tgt, ref_tgt), msgs


# -- packing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "none"])
def test_packing_keeps_documents_whole_and_masks_boundaries(mode):
    rng = np.random.default_rng(0)
    L = 32
    # some longer than seq_len; none leaves a 1-token tail piece (nothing to learn: dropped, tested below)
    docs = [d for d in _docs(rng, 70, 2, 90) if len(d[0]) % L != 1][:60]
    packed = pack_documents(docs, L, mode, pad_id=7)
    ids, tgt, tok_ = packed.input_ids, packed.target, packed.token
    assert ids.shape[1] == L and (ids[tok_ == 0] == 7).all()
    # every token of every document appears exactly once
    real = ids[tok_ == 1]
    assert sorted(real.tolist()) == sorted(np.concatenate([d[0] for d in docs]).tolist())
    for r in range(len(packed)):
        row = ids[r][tok_[r] == 1]
        assert (tok_[r][:len(row)] == 1).all()  # padding only at the end
        doc_of = row // 1000
        # a document in a row is a contiguous run of consecutive tokens
        for k in np.unique(doc_of):
            pos = np.nonzero(doc_of == k)[0]
            assert (np.diff(pos) == 1).all() and (np.diff(row[pos]) == 1).all()
        # a counted prediction never crosses into another document or padding
        for i in np.nonzero(tgt[r])[0]:
            assert i + 1 < L and tok_[r, i + 1] and doc_of[i] == row[i + 1] // 1000
    # documents that fit are never cut: each short document lives in one row
    for ids_d, _ in docs:
        if len(ids_d) <= L:
            rows = {r for r in range(len(packed)) if np.isin(ids_d[0], ids[r])}
            assert len(rows) == 1 and all(np.isin(ids_d, ids[next(iter(rows))]))
    assert packed.n_split == sum(len(d[0]) > L for d in docs)
    # counted targets: every in-document successor except across pieces of split documents
    expected = sum(min(len(d[0]), L) - 1 if len(d[0]) <= L else len(d[0]) - 1 - (len(d[0]) - 1) // L for d in docs)
    assert int(tgt.sum()) == expected


def test_pieces_without_targets_are_dropped():
    docs = _docs(np.random.default_rng(0), 1, 33, 34)  # 33 tokens, seq_len 32: the tail is its EOS alone
    packed = pack_documents(docs, 32)
    assert len(packed) == 1 and packed.token.sum() == 32 and packed.target.sum() == 31


def test_greedy_packs_tighter_than_one_document_per_row():
    docs = _docs(np.random.default_rng(1), 200, 2, 20)
    greedy, none = pack_documents(docs, 64, "greedy"), pack_documents(docs, 64, "none")
    assert len(none) == 200 and len(greedy) < 200 / 3
    assert greedy.token.mean() > 0.9


def test_build_packed_from_config(tmp_path, tok):
    p = write_text_jsonl(tmp_path / "a.jsonl", n=20)
    cfg = DataConfig(path=str(p), seq_len=48)
    packed = build_packed(cfg, tok)
    assert packed.n_documents == 20 and packed.input_ids.dtype == np.int32
    assert packed.input_ids.max() < len(tok)


# -- sampler and loader ------------------------------------------------------------------------------------


def test_sampler_epochs_cover_every_row_once():
    s = ResumableSampler(10, 3, seed=1)
    seen = [s.next_global_batch() for _ in range(3)]  # 9 rows; the 10th row is dropped this epoch
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == 9
    nxt = s.next_global_batch()
    assert s.epoch == 1 and len(nxt) == 3
    assert not np.array_equal(ResumableSampler(10, 3, seed=1)._permutation(1), s._permutation(0))


def test_sampler_resume_neither_replays_nor_skips():
    a = ResumableSampler(50, 4, seed=3)
    straight = [a.next_global_batch() for _ in range(30)]
    b = ResumableSampler(50, 4, seed=3)
    first = [b.next_global_batch() for _ in range(11)]
    c = ResumableSampler(50, 4, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))  # through JSON, as in a checkpoint
    rest = [c.next_global_batch() for _ in range(19)]
    for x, y in zip(straight, first + rest):
        assert np.array_equal(x, y)
    d = ResumableSampler(51, 4, seed=3)
    with pytest.raises(ValueError, match="same data"):
        d.load_state_dict(b.state_dict())


def test_ranks_share_the_global_batch_exactly():
    """2 ranks x 1 micro-batch of 2 == 1 rank x 2 micro-batches of 2, row for row, across a resume
    from 2 ranks to 1 (the world size changes; the global batch does not)."""
    rng = np.random.default_rng(0)
    packed = pack_documents(_docs(rng, 80, 2, 30), 32)
    one = DistillLoader(packed, micro_batch=2, grad_accum=2, rank=0, world=1, seed=5)
    two = [DistillLoader(packed, micro_batch=2, grad_accum=1, rank=r, world=2, seed=5) for r in range(2)]
    for step in range(6):
        a = one.next_step()
        b = [ld.next_step() for ld in two]
        rows_one = np.concatenate([m.input_ids.numpy() for m in a.micro])
        rows_two = np.concatenate([m.input_ids.numpy() for bb in b for m in bb.micro])
        assert np.array_equal(rows_one, rows_two)
        assert a.n_target == b[0].n_target == b[1].n_target == sum(int(m.target.sum()) for bb in b for m in bb.micro)
        assert a.n_token == sum(int(m.token.sum()) for m in a.micro)
    resumed = DistillLoader(packed, micro_batch=2, grad_accum=2, rank=0, world=1, seed=5)
    resumed.load_state_dict(two[0].state_dict())
    assert np.array_equal(resumed.next_step().rows, one.next_step().rows)


def test_too_little_data_is_a_clear_error():
    packed = pack_documents(_docs(np.random.default_rng(0), 3, 2, 5), 32)
    with pytest.raises(ValueError, match="packed sequences but one step needs a global batch of 8"):
        DistillLoader(packed, micro_batch=4, grad_accum=1, world=2)


def test_data_cache_key_follows_files_and_settings(tmp_path, tok):
    from rad_ds.data.loader import data_cache_key, load_packed

    p = write_text_jsonl(tmp_path / "a.jsonl", n=10)
    cfg = DataConfig(path=str(p), seq_len=32)
    k1 = data_cache_key(cfg, tok)
    assert data_cache_key(DataConfig(path=str(p), seq_len=64), tok) != k1
    first = load_packed(cfg, tok, tmp_path / "cache")
    assert (tmp_path / "cache" / k1 / "packed.npz").is_file()
    again = load_packed(cfg, tok, tmp_path / "cache")
    assert np.array_equal(first.input_ids, again.input_ids)
    write_text_jsonl(p, n=12, seed=1)
    assert data_cache_key(cfg, tok) != k1
    assert Path(p).exists()


# -- references: what rad-ds computed before, kept to test the fast paths against ------------------------


# -- document boundaries: position_ids ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "none"])
def test_position_ids_restart_at_every_document_and_continue_into_padding(mode):
    L = 32
    docs = _docs(np.random.default_rng(4), 60, 2, 80)  # token i of document k is 1000 * (k + 1) + i
    packed = pack_documents(docs, L, mode)
    pos, ids, real = packed.position_ids, packed.input_ids, packed.token.astype(bool)
    assert pos.dtype == np.int32 and pos.shape == ids.shape
    for r in range(len(packed)):
        n = int(real[r].sum())
        # a real token's position is its index in its document piece (pieces of a split document start at
        # multiples of seq_len); padding continues the count of the row's last document
        assert np.array_equal(pos[r, :n], (ids[r, :n] % 1000) % L)
        assert np.array_equal(pos[r, n:], pos[r, n - 1] + np.arange(1, L - n + 1))
        starts = np.nonzero(pos[r] == 0)[0]
        assert len(starts) == len(np.unique(ids[r, :n] // 1000 * 100 + (ids[r, :n] % 1000) // L))
    one_doc = [r for r in range(len(packed)) if (pos[r] == 0).sum() == 1]
    assert all(np.array_equal(pos[r], np.arange(L)) for r in one_doc)  # no restart: the plain causal path
    if mode == "none":
        assert len(one_doc) == len(packed)
    else:
        assert len(one_doc) < len(packed)  # packing did put several documents in rows


def test_loader_serves_position_ids():
    packed = pack_documents(_docs(np.random.default_rng(0), 80, 2, 30), 32)
    loader = DistillLoader(packed, micro_batch=2, grad_accum=2, seed=1)
    step = loader.next_step()
    for mb, rows in zip(step.micro, ResumableSampler.shard(step.rows, 0, 1, 2)):
        assert mb.position_ids.dtype == torch.long and mb.position_ids.shape == mb.input_ids.shape
        assert np.array_equal(mb.position_ids.numpy(), packed.position_ids[rows])


# -- packing = the former best-fit -------------------------------------------------------------------------


def test_best_fit_equals_the_former_packer_on_random_lengths():
    from rad_ds.data.packing import _best_fit_decreasing

    rng = np.random.default_rng(0)
    for _ in range(300):
        cap = int(rng.integers(1, 70))
        lengths = rng.integers(1, cap + 1, size=int(rng.integers(0, 250))).tolist()  # many ties
        bin_of = _best_fit_decreasing(lengths, cap).tolist()
        bins = [[i for i, b in enumerate(bin_of) if b == k] for k in range(max(bin_of, default=-1) + 1)]
        assert bins == reference_best_fit(lengths, cap), (cap, lengths)


@pytest.mark.parametrize("mode", ["greedy", "none"])
def test_rows_equal_the_former_packer(mode):
    rng = np.random.default_rng(2)
    for _ in range(20):
        L = int(rng.integers(4, 48))
        docs = []
        for k in range(int(rng.integers(1, 80))):
            ids = rng.integers(0, 250, size=int(rng.integers(1, 3 * L)))
            tgt = (rng.random(len(ids)) < 0.6).astype(np.uint8)
            tgt[-1] = 0
            docs.append((ids, tgt))
        packed = pack_documents(docs, L, mode, pad_id=5)
        ref = reference_rows(docs, L, mode)
        assert len(packed) == len(ref)
        for r, (ids, tgt) in enumerate(ref):
            n = len(ids)
            assert np.array_equal(packed.input_ids[r, :n], ids) and np.array_equal(packed.target[r, :n], tgt)
            assert packed.token[r, :n].all() and not packed.token[r, n:].any() and (packed.input_ids[r, n:] == 5).all()


# -- long and unusable documents ----------------------------------------------------------------------------


def test_truncate_keeps_the_first_seq_len_tokens_and_split_keeps_all():
    L = 32
    docs = [d for d in _docs(np.random.default_rng(3), 60, 2, 100) if len(d[0]) % L != 1][:40]  # no 1-token tails
    n_long = sum(len(d[0]) > L for d in docs)
    split, cut = pack_documents(docs, L, long_documents="split"), pack_documents(docs, L, long_documents="truncate")
    assert n_long > 0 and (split.n_split, split.n_truncated) == (n_long, 0) and (cut.n_split, cut.n_truncated) == (0, n_long)
    assert split.token.sum() == sum(len(d[0]) for d in docs)
    assert cut.token.sum() == sum(min(len(d[0]), L) for d in docs)
    kept = cut.input_ids[cut.token.astype(bool)]
    assert (kept % 1000 < L).all() and len(np.unique(kept // 1000)) == len(docs)  # every document, its head only
    # the last kept position of a truncated document predicts a token that is gone: not counted
    assert int(cut.target.sum()) == sum(min(len(d[0]), L) - 1 for d in docs)
    with pytest.raises(ValueError, match="long_documents 'cut'"):
        pack_documents(docs, L, long_documents="cut")


@pytest.mark.parametrize("long_documents", ["split", "truncate"])
def test_split_truncated_and_dropped_documents_are_counted_in_the_log(tmp_path, tok, caplog, long_documents):
    p = tmp_path / "a.jsonl"
    texts = ["x" * 100, "y" * 70, "short one", "", ""]  # 2 longer than seq_len 48 (bytes + EOS); 2 EOS only
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with caplog.at_level(logging.INFO, logger="rad_ds.data.loader"):
        packed = build_packed(DataConfig(path=str(p), seq_len=48, long_documents=long_documents), tok)
    line = [r.getMessage() for r in caplog.records if r.name == "rad_ds.data.loader"][-1]
    assert "5 records -> 3 documents (dropped 2: 0 empty, 2 shorter than data.min_tokens=2, 0 with nothing" in line
    expected = "2 split, 0 truncated" if long_documents == "split" else "0 split, 2 truncated"
    assert f"2 longer than data.seq_len=48 ({expected}" in line
    assert (packed.n_split, packed.n_truncated) == ((2, 0) if long_documents == "split" else (0, 2))
    # chat: a conversation without an assistant turn has nothing to learn
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                 + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rad_ds.data.loader"):
        build_packed(DataConfig(path=str(c), seq_len=48), tok)
    assert "(dropped 1: 0 empty, 0 shorter than data.min_tokens=2, 1 with nothing to learn)" in caplog.text


def test_config_checks_the_new_data_settings():
    from rad_ds.distill.config import ConfigError, DistillConfig

    def cfg(**data):
        c = DistillConfig()
        c.out, c.data.path, c.student.layers = "runs/x", str(ROOT / "rad_ds" / "data" / "demo_chat.jsonl"), [1]
        for k, v in data.items():
            setattr(c.data, k, v)
        return c

    cfg(long_documents="truncate", num_proc=1).validate()
    with pytest.raises(ConfigError, match="data.long_documents = 'cut': use one of split, truncate"):
        cfg(long_documents="cut").validate()
    with pytest.raises(ConfigError, match="data.num_proc = 0 must be >= 1"):
        cfg(num_proc=0).validate()


# -- chat masks: one render per conversation = the per-prefix definition ------------------------------------

_CONVERSATIONS = [
    [("user", "what is 2 plus 3?"), ("assistant", "5.")],
    [("system", "Answer briefly."), ("user", "hi"), ("assistant", "hello"), ("user", "and bye?"), ("assistant", "bye!")],
    [("user", "say assistant"), ("assistant", "assistant")],  # the answer is in the prompt and in the markup
    [("user", "repeat: ok"), ("assistant", "ok"), ("user", "ok"), ("assistant", "ok")],
    [("user", "nothing?"), ("assistant", ""), ("user", "two\nlines"), ("assistant", " line one\nline two\n ")],
    [("assistant", "I start."), ("user", "fine"), ("assistant", "good")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"), ("assistant", "f"),
     ("user", "g"), ("assistant", "h")],
]
SMOLLM2_LIKE = (  # SmolLM2's template: a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRIMMING = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")  # no single turn shape for " x "
GENERATION = (  # ChatML with {% generation %} blocks: the template marks the answers itself
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_conversations(path, conversations):
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
                            for conv in conversations))
    return path


@pytest.mark.parametrize("template", ["chatml", "smollm2_like", "trimming", "generation"])
def test_chat_mask_equals_the_per_prefix_definition(tmp_path, template):
    from rad_ds.data.tokenization import tokenize_documents

    t = byte_tokenizer({"chatml": CHATML, "smollm2_like": SMOLLM2_LIKE, "trimming": TRIMMING,
                        "generation": GENERATION}[template])
    recs = load_records(str(_write_conversations(tmp_path / "c.jsonl", _CONVERSATIONS)))
    docs = tokenize_documents(recs, t, min_tokens=1, num_proc=1)
    assert len(docs) == len(_CONVERSATIONS)
    for (ids, tgt), msgs in zip(docs, recs.dataset["messages"]):
        ref_ids, ref_tgt = reference_chat_doc(msgs, t)
        if template == "generation" and msgs[0]["role"] == "assistant":
            # the definition counts an opening answer's header too (no prompt to cut it at); the template's
            # own blocks mark the answers only
            assert np.array_equal(ids, ref_ids)
            assert t.decode(ids[1:][tgt[:-1].astype(bool)]) == "I start.<|im_end|>\ngood<|im_end|>\n"
            continue
        assert np.array_equal(ids, ref_ids) and np.array_equal(tgt, ref_tgt), msgs
    # one render per conversation, except where a trimmed turn is not in the rendering as it was given
    assert docs.stats["slow_masks"] == (1 if template == "trimming" else 0)


def test_chat_mask_in_two_processes_and_from_the_cache(tmp_path, tok, monkeypatch):
    import rad_ds.data.tokenization as T

    convs = _CONVERSATIONS * 6
    one = T.tokenize_documents(load_records(str(_write_conversations(tmp_path / "a.jsonl", convs))), tok, num_proc=1)
    monkeypatch.setattr(T, "MIN_RECORDS_PER_PROC", 1)
    two = T.tokenize_documents(load_records(str(_write_conversations(tmp_path / "b.jsonl", convs))), tok, num_proc=2)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.target, two.target)
    assert np.array_equal(one.offsets, two.offsets)

    def not_again(*a, **k):
        raise AssertionError("tokenised again: datasets' cache was not used")

    monkeypatch.setattr(T, "encode_batch", not_again)  # same data, tokenizer and settings: read from the cache
    again = T.tokenize_documents(load_records(str(tmp_path / "a.jsonl")), tok, num_proc=2)
    assert np.array_equal(again.ids, one.ids) and np.array_equal(again.target, one.target)


def test_chat_mask_where_spans_cannot_be_located_is_a_clear_error(tmp_path):
    from rad_ds.data.tokenization import tokenize_documents

    # a template that renders the last message differently: prefixes are not prefixes of the whole
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} <end>{% endif %}\n"
           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    p = _write_conversations(tmp_path / "c.jsonl", [_CONVERSATIONS[1]])
    with pytest.raises(DataError, match="record 0: the chat template does not render a conversation prefix .* "
                                        "set data.mask_prompt=false"):
        tokenize_documents(load_records(str(p)), byte_tokenizer(odd), num_proc=1)
    (_, tgt), = tokenize_documents(load_records(str(p)), byte_tokenizer(odd), mask_prompt=False, num_proc=1)
    assert tgt[:-1].all() and tgt[-1] == 0


# -- the packed cache: built once per filesystem, identical everywhere ------------------------------------------

# Each process marks its arrival at the cache's file lock (a file in the handshake folder, argv[3]); the one that
# gets the lock builds only once both have arrived, so the other is certain to be waiting on the lock meanwhile.
_LOAD = """
import hashlib, json, os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import numpy as np
import rad_ds.core.shared_cache as S
import rad_ds.data.loader as L
from rad_ds.data.config import DataConfig
from tests.distill_helpers import byte_tokenizer

hand = Path(sys.argv[3])
build = L.build_packed

class ArrivingLock(S.FileLock):
    def acquire(self, *args, **kwargs):
        (hand / f"arrived-{{os.getpid()}}").touch()
        return super().acquire(*args, **kwargs)

def build_when_both_arrived(cfg, tok):
    print("BUILD", flush=True)
    deadline = time.monotonic() + 120
    while len(list(hand.glob("arrived-*"))) < 2:  # a file handshake: polled, not slept on for a guessed time
        if time.monotonic() > deadline:
            raise SystemExit("the other process never came to the lock")
        time.sleep(0.01)
    return build(cfg, tok)

S.FileLock = ArrivingLock
L.build_packed = build_when_both_arrived
p = L.load_packed(DataConfig(path=sys.argv[1], seq_len=48), byte_tokenizer(), sys.argv[2])
h = hashlib.sha1()
for name, a in sorted(p.arrays().items()):
    h.update(name.encode() + np.ascontiguousarray(a).tobytes())
print(json.dumps({{"arrays": h.hexdigest(), "rows": len(p)}}), flush=True)
"""


def test_two_processes_on_a_cold_cache_build_it_once(tmp_path):
    data = write_chat_jsonl(tmp_path / "c.jsonl", n=30)
    script = tmp_path / "load.py"
    script.write_text(_LOAD.format(root=str(ROOT)))
    cache, hand = tmp_path / "out" / "data", tmp_path / "handshake"
    hand.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(data), str(cache), str(hand)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(f.name for f in hand.iterdir()) == sorted(f"arrived-{p.pid}" for p in procs)  # both at the lock
    lines = [o[0].strip().splitlines() for o in outs]
    assert sum(ln.count("BUILD") for ln in lines) == 1  # one built, the other waited on the lock and read it
    results = [json.loads(ln[-1]) for ln in lines]
    assert results[0] == results[1] and results[0]["rows"] > 0
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        __import__("rad_ds.data.loader", fromlist=["x"]).data_cache_key(DataConfig(path=str(data), seq_len=48),
                                                                       byte_tokenizer())]
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name or p.name.endswith(".error.json")]


def test_a_failed_build_is_the_waiting_ranks_error_too(tmp_path, tok, monkeypatch):
    """Two ranks (threads) at a cold cache: the one that takes the lock fails its build only once the other is
    waiting on the lock (an event, not a guessed sleep), and the waiting rank raises the same error."""
    import rad_ds.core.shared_cache as S
    import rad_ds.data.loader as L

    cfg = DataConfig(path=str(write_text_jsonl(tmp_path / "a.jsonl", n=6)), seq_len=32)
    real, calls, errors, arrived = L.build_packed, [], [], []
    both_at_lock, guard = threading.Event(), threading.Lock()

    class ArrivingLock(S.FileLock):
        def acquire(self, *args, **kwargs):  # a rank has come to the cache's lock
            with guard:
                arrived.append(threading.get_ident())
                if len(arrived) == 2:
                    both_at_lock.set()
            return super().acquire(*args, **kwargs)

    def failing(cfg, tok):
        calls.append(1)
        if not both_at_lock.wait(60):
            raise RuntimeError("the other rank never came to the lock")
        raise DataError("a.jsonl record 3: broken (the fix)")

    def rank():
        try:
            L.load_packed(cfg, tok, tmp_path / "cache")
        except DataError as e:
            errors.append(str(e))

    monkeypatch.setattr(S, "FileLock", ArrivingLock)
    monkeypatch.setattr(L, "build_packed", failing)
    ranks = [threading.Thread(target=rank) for _ in range(2)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(120)
    assert not any(t.is_alive() for t in ranks)
    assert sorted(arrived) == sorted(t.ident for t in ranks)  # the race was staged: both ranks met at the lock
    assert errors == ["a.jsonl record 3: broken (the fix)"] * 2 and len(calls) == 1  # built (and failed) once
    monkeypatch.setattr(L, "build_packed", real)  # a later start, after the fix, builds
    assert len(L.load_packed(cfg, tok, tmp_path / "cache")) > 0
    assert not list((tmp_path / "cache").glob(".*.error.json"))


def test_the_cache_file_is_the_same_bytes_wherever_it_is_built(tmp_path, tok):
    """Built a day apart (the clock is moved, not waited for: a zip timestamp has 2 s steps, so a short sleep
    could leave it unchanged), the file is the same bytes."""
    import zipfile

    from rad_ds.data.loader import read_packed, save_packed

    cfg = DataConfig(path=str(write_chat_jsonl(tmp_path / "c.jsonl", n=20)), seq_len=64)
    now = time.time()

    def at(clock, write, path):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(time, "time", lambda: clock)
            write(path)
        return path.read_bytes()

    def stamped(path):  # a zip whose entry takes the clock's time, as zipfile gives a named entry
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("rows.npy", b"rows")

    assert at(now, stamped, tmp_path / "s1.zip") != at(now + 86400, stamped, tmp_path / "s2.zip")  # the clock tells
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert at(now, lambda p: save_packed(build_packed(cfg, tok), p), a) == \
        at(now + 86400, lambda p: save_packed(build_packed(cfg, tok), p), b)
    back = read_packed(a)
    assert np.array_equal(back.position_ids, build_packed(cfg, tok).position_ids)


def test_shipped_demo_text_is_disjoint_from_the_ppl_evaluation():
    """The demo distils on ``demo_text.jsonl`` and scores perplexity on rad-evaluate's default texts: no document
    may be shared, no math question either (checked against a larger default set than the demo evaluates)."""
    from rad_ds.data.demo_text import DEMO_TEXT, demo_documents
    from rad_ds.eval.perplexity import load_texts

    shipped = [json.loads(x)["text"] for x in DEMO_TEXT.read_text().splitlines()]
    assert len(shipped) >= 150 and len(set(shipped)) == len(shipped)
    assert sum(d.startswith("Question: ") for d in shipped) >= 100  # math and code interleaved
    evals = load_texts(None, 256, 0)
    assert not set(shipped) & set(evals)
    questions = {t.split("\nAnswer: ")[0] for t in evals if t.startswith("Question: ")}
    assert not {d.split("\nAnswer: ")[0] for d in shipped if d.startswith("Question: ")} & questions
    # the math half is rebuilt exactly from its seed (the code half depends on the Python version's stdlib)
    fresh = [d for d in demo_documents() if d.startswith("Question: ")]
    assert fresh == [d for d in shipped if d.startswith("Question: ")]
