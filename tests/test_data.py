"""Data: loading and its errors, chat-template masks, packing invariants, the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rad_ds.data import (
    DataError,
    DistillLoader,
    ResumableSampler,
    build_packed,
    load_records,
    pack_documents,
    tokenize_records,
)
from rad_ds.distill.config import DataConfig
from tests.distill_helpers import byte_tokenizer, write_chat_jsonl, write_text_jsonl


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
    assert (tmp_path / "cache" / f"{k1}.npz").is_file()
    again = load_packed(cfg, tok, tmp_path / "cache")
    assert np.array_equal(first.input_ids, again.input_ids)
    write_text_jsonl(p, n=12, seed=1)
    assert data_cache_key(cfg, tok) != k1
    assert Path(p).exists()
