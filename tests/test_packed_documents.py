"""Packed rows keep documents apart: ``position_ids`` restarting at 0 mark documents (transformers'
convention). The oracle is each document run alone: its logits and every parameter's gradient must be
what the packed row gives (float64, a hybrid with attention and Mamba2 layers, documents whose lengths
cross the scan's chunk boundaries). Also: the torch scan and conv with ``seq_idx`` against the step
recurrence; generation after a packed prompt; an exported student under plain transformers; bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rad_ds.models import RadHybridForCausalLM
from rad_ds.models.ssd_scan import ssd_chunk_scan, ssd_scan_ref
from rad_ds.models.ssm_ops import causal_conv1d
from tests.helpers import tiny_config
from tests.test_model_import import BLOCK_RAD_DS

LENGTHS = [(13, 21, 30), (40, 24)]  # chunk size 16: documents start inside chunks and on a chunk boundary


def _model(dtype=torch.float64, **kw) -> RadHybridForCausalLM:
    torch.manual_seed(0)
    m = RadHybridForCausalLM(tiny_config(**kw)).to(dtype)
    for p in m.parameters():  # non-trivial values everywhere (dt_bias, A_log, D, norms included)
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def _rows(lengths_per_row, vocab: int = 256, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(0, vocab, (n,), generator=g) for n in lengths] for lengths in lengths_per_row]
    ids = torch.stack([torch.cat(d) for d in docs])
    pos = torch.stack([torch.cat([torch.arange(len(x)) for x in d]) for d in docs])
    return docs, ids, pos


def _weights(shape, seed: int):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_packed_logits_and_gradients_equal_documents_alone():
    model = _model()
    docs, ids, pos = _rows(LENGTHS)
    w = _weights((*ids.shape, 256), 2)  # a fixed random readout of the logits, so every logit matters

    model.zero_grad()
    logits = model(ids, position_ids=pos).logits
    (logits * w).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for r, row in enumerate(docs):
        start = 0
        for d in row:
            alone = model(d[None]).logits  # no position_ids: one document, positions 0..n-1
            assert (alone[0] - logits[r, start:start + len(d)]).abs().max().item() <= 1e-6
            (alone[0] * w[r, start:start + len(d)]).sum().backward()
            start += len(d)
    for n, p in model.named_parameters():
        ref = p.grad
        assert (packed_grads[n] - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item()), n
        assert ref.abs().max().item() > 0, n  # every parameter takes part


def test_without_boundaries_documents_do_leak():
    """The same row with plain positions (no restarts) gives other logits: the oracle can fail."""
    model = _model()
    docs, ids, pos = _rows(LENGTHS[:1])
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
        plain = model(ids).logits
    first = len(docs[0][0])
    assert torch.allclose(packed[:, :first], plain[:, :first], atol=1e-9)  # the first document is alone anyway
    assert (packed[:, first:] - plain[:, first:]).abs().max().item() > 1e-3


def test_packed_attention_only_and_sliding_window():
    for kw in ({"layer_types": ["attention"] * 4}, {"layer_types": ["attention", "mamba2"] * 2, "sliding_window": 8}):
        model = _model(**kw)
        docs, ids, pos = _rows(LENGTHS[:1], seed=3)
        with torch.no_grad():
            packed = model(ids, position_ids=pos).logits[0]
            start = 0
            for d in docs[0]:
                assert (model(d[None]).logits[0] - packed[start:start + len(d)]).abs().max().item() <= 1e-9
                start += len(d)


def test_scan_and_conv_with_seq_idx_against_the_step_recurrence():
    g = torch.Generator().manual_seed(0)
    b, l, h, p, ng, n = 2, 150, 4, 8, 2, 16
    x = torch.randn(b, l, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, l, h, generator=g, dtype=torch.float64) * 0.5
    A = -torch.rand(h, generator=g, dtype=torch.float64) - 0.1
    B, C = (torch.randn(b, l, ng, n, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.randn(h, generator=g, dtype=torch.float64)
    seq = torch.zeros(b, l, dtype=torch.long)
    seq[0, 37:], seq[0, 64:], seq[0, 100:] = 1, 2, 3  # 64: a document starting exactly at a chunk start
    seq[1, 5:], seq[1, 128:] = 1, 2
    init = torch.randn(b, h, p, n, generator=g, dtype=torch.float64)
    for chunk in (16, 32, 64):
        for state in (None, init):
            y, f = ssd_chunk_scan(x, dt, A, B, C, chunk, D, state, True, seq_idx=seq)
            yr, fr = ssd_scan_ref(x, dt, A, B, C, D, state, True, seq_idx=seq)
            assert (y - yr).abs().max().item() < 1e-10 and (f - fr).abs().max().item() < 1e-10
    # the conv: each document's output equals the conv of that document alone
    xc = torch.randn(b, 6, l, generator=g, dtype=torch.float64)
    wc, bc = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    y, state = causal_conv1d(xc, wc, bc, seq_idx=seq)
    for r in range(b):
        for d in seq[r].unique():
            idx = (seq[r] == d).nonzero()[:, 0]
            alone, alone_state = causal_conv1d(xc[r:r + 1, :, idx], wc, bc)
            assert torch.allclose(y[r:r + 1, :, idx], alone, atol=1e-12)
        assert torch.allclose(state[r:r + 1], alone_state, atol=0)  # the state is the last document's


def test_generation_after_a_packed_prompt_continues_its_last_document():
    model = _model(torch.float32).eval()
    docs, ids, pos = _rows([(11, 19)], seed=4)
    last = docs[0][1][None]
    with torch.no_grad():
        packed = model.generate(ids, position_ids=pos, max_new_tokens=8, do_sample=False)
        alone = model.generate(last, max_new_tokens=8, do_sample=False)
    assert torch.equal(packed[0, ids.size(1):], alone[0, last.size(1):])


def test_exported_student_keeps_documents_apart_under_plain_transformers(tmp_path):
    model = _model(torch.float32)
    model.save_pretrained(tmp_path / "m")
    docs, ids, pos = _rows(LENGTHS[:1], seed=5)
    torch.save((ids, pos, [len(d) for d in docs[0]], [d[None] for d in docs[0]]), tmp_path / "inputs.pt")
    code = BLOCK_RAD_DS + f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids, pos, lengths, alone = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    packed = m(ids, position_ids=pos).logits[0]
    start, worst = 0, 0.0
    for n, d in zip(lengths, alone):
        worst = max(worst, (m(d).logits[0] - packed[start:start + n]).abs().max().item())
        start += n
print("MAXDIFF", worst)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("MAXDIFF")[1].split()[0]) < 1e-4


@pytest.mark.parametrize("make, message", [
    (lambda p: p + torch.tensor([[1] + [0] * (p.size(1) - 1)]), "must start at 0 in every row; row 0 starts at 1"),
    (lambda p: torch.cat([p[:, :5], p[:, 5:6] - 3, p[:, 6:]], 1), "must count up by one inside a document"),
])
def test_bad_position_ids_are_refused(make, message):
    model = _model(torch.float32)
    _, ids, pos = _rows(LENGTHS[:1])
    with pytest.raises(ValueError, match=message):
        model(ids, position_ids=make(pos))



def test_packed_rows_with_padding_and_left_padded_generation():
    """A padding mask on a packed row changes nothing for its real tokens; left padding (whose first real
    token is position 0 again, as transformers' generate() numbers it) starts no document."""
    model = _model()
    _, ids, pos = _rows(LENGTHS[:1])
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad():
        full = model(ids, position_ids=pos).logits
        padded = model(ids, position_ids=pos, attention_mask=mask).logits
        assert (full[0, :-3] - padded[0, :-3]).abs().max().item() <= 1e-9
        left = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids[:, :13]], 1)
        lmask = torch.cat([torch.zeros(1, 4, dtype=mask.dtype), torch.ones(1, 13, dtype=mask.dtype)], 1)
        lpos = (lmask.cumsum(-1) - 1).masked_fill(lmask == 0, 1)
        got = model(left, position_ids=lpos, attention_mask=lmask).logits[0, 4:]
        assert (got - full[0, :13]).abs().max().item() <= 1e-9
