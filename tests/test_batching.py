"""The shared batch pieces (rad_ds.core.batching) against independent oracles: a left-padded batch gives every
document the last-token logits it has alone, through a tiny attention + Mamba2 model; the one pad-id rule on every
kind of tokenizer; length-sorted batches against a brute-force reading of their contract."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from rad_ds.core.batching import left_padded, length_sorted_batches, pad_id
from rad_ds.models import RadHybridForCausalLM
from tests.helpers import tiny_config


@pytest.mark.parametrize("pad_token_id, eos_token_id, expected", [
    (5, 2, 5),  # the tokenizer's pad id first
    (0, 2, 0),  # a pad id of 0 is a pad id, not "unset"
    (None, 2, 2),  # else its EOS id
    (None, 0, 0),
    (None, [7, 3, 9], 3),  # else the smallest of several (whatever their order)
    (None, None, 0),  # else 0
    (None, [], 0),
])
def test_pad_id_rule(pad_token_id, eos_token_id, expected):
    assert pad_id(SimpleNamespace(pad_token_id=pad_token_id, eos_token_id=eos_token_id)) == expected
    assert pad_id(SimpleNamespace()) == 0  # no such attributes at all


def test_left_padded_layout():
    ids, mask = left_padded([torch.tensor([4, 5, 6]), [7], torch.tensor([8, 9])], pad=1)
    assert ids.tolist() == [[4, 5, 6], [1, 1, 7], [1, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("pad", [0, 17])
def test_left_padded_batch_gives_each_document_its_own_last_token_logits(pad):
    """Oracle: each document run alone (no padding at all). Attention masks the padding and Mamba2 zeroes it, so
    the last column of the batch holds every document's own next-token logits, whatever the pad id."""
    torch.manual_seed(0)
    model = RadHybridForCausalLM(tiny_config(num_hidden_layers=4)).eval()  # attention, mamba2, attention, mamba2
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 256, (n,), generator=g) for n in (3, 11, 1, 20)]
    ids, mask = left_padded(docs, pad)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits[:, -1]
        alone = torch.stack([model(d.view(1, -1)).logits[0, -1] for d in docs])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def _brute_force_ok(batches, lengths, batch_size, max_tokens):
    """The contract, read literally: a partition of the indices, longest first (ties by index), no batch over
    batch_size, and no batch of 2+ items over max_tokens padded tokens."""
    flat = [i for b in batches for i in b]
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        if max_tokens and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= max_tokens
    return True


@pytest.mark.parametrize("batch_size, max_tokens", [(1, None), (2, None), (3, None), (4, 12), (3, 5), (8, 1)])
def test_length_sorted_batches(batch_size, max_tokens):
    for lengths in itertools.product([1, 3, 4], repeat=4):
        lengths = list(lengths) + [2]
        b = length_sorted_batches(lengths, batch_size, max_tokens)
        assert _brute_force_ok(b, lengths, batch_size, max_tokens)
        if max_tokens is None:  # greedy filling: every batch but the last is full
            assert all(len(x) == batch_size for x in b[:-1])
