"""Generation with the hybrid cache: cached == uncached, padded batches == single sequences."""

from __future__ import annotations

import torch

from rad_ds.models import RadHybridCache
from rad_ds.models.conversion import from_hf_model
from rad_ds.surgery import replace_attention
from tests.model_factories import tiny_hf_model


def _hybrid(family="llama3", layers=(0, 2)):
    model = from_hf_model(tiny_hf_model(family))
    replace_attention(model, list(layers))
    return model.eval()


def test_incremental_forward_equals_full_forward():
    model = _hybrid()
    ids = torch.randint(0, 320, (2, 70))  # > one scan chunk (64)
    with torch.no_grad():
        full = model(ids).logits
        cache = RadHybridCache(model.config)
        parts = [model(ids[:, :30], cache=cache, use_cache=True).logits]
        for t in range(30, 40):  # one token at a time: the decode-step path
            parts.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        parts.append(model(ids[:, 40:], cache=cache, use_cache=True).logits)  # multi-token with state in
    assert cache.seen_tokens == 70
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_cached_greedy_equals_uncached_greedy():
    model = _hybrid()
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        a = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                           pad_token_id=0)
        b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                           use_cache=False, pad_token_id=0)
    assert a.shape == (2, 35)
    assert torch.equal(a, b)


def test_greedy_generate_equals_argmax_loop():
    """HF generate() with our cache == a hand-written loop of full forwards (the definition of greedy)."""
    model = _hybrid("qwen2", layers=(1,))
    ids = torch.randint(0, 320, (1, 9))
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, seq)


def test_left_padded_batch_equals_single_sequences():
    model = _hybrid()
    a = torch.randint(1, 320, (1, 13))
    b = torch.randint(1, 320, (1, 7))
    pad = torch.zeros(1, 6, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        ra = model.generate(a, max_new_tokens=12, do_sample=False, pad_token_id=0)
        rb = model.generate(b, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], ra[0])
    assert torch.equal(out[1, 6:], rb[0])


def test_skip_layers_is_the_model_without_those_mixers():
    """skip_layers (the diagnosis draft) equals physically deleting the mixer's contribution."""
    model = _hybrid(layers=(2,))
    ids = torch.randint(0, 320, (1, 15))
    with torch.no_grad():
        skipped = model(ids, skip_layers=[1, 2]).logits
        for i in (1, 2):
            layer = model.model.layers[i]
            layer.mixer.register_forward_hook(lambda m, inp, out: torch.zeros_like(out))
        zeroed = model(ids).logits
    assert torch.allclose(skipped, zeroed, atol=1e-6)


def test_kv_cache_appends_in_place_and_snapshots_copy_on_write():
    """A decode step writes into the buffer (no reallocation while there is room); a snapshot and the live
    cache never see each other's later tokens; crop is a view."""
    from rad_ds.models.hybrid_cache import AttentionState

    g = torch.Generator().manual_seed(0)
    kv = lambda n: (torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g))  # noqa: E731
    a = AttentionState()
    k0, v0 = kv(10)
    a.update(k0, v0)
    buf = a._k.data_ptr()
    steps = [kv(1) for _ in range(20)]
    for k, v in steps:
        a.update(k, v)
    assert a._k.data_ptr() == buf and a.length == 30  # 20 appends, no new buffer
    want = torch.cat([k0] + [k for k, _ in steps], dim=2)
    torch.testing.assert_close(a.key, want)
    snap = a.share()
    ka, va = kv(3)
    kb, vb = kv(3)
    a.update(ka, va)  # the live side moves to its own buffer first
    snap.update(kb, vb)
    torch.testing.assert_close(a.key, torch.cat([want, ka], dim=2))
    torch.testing.assert_close(snap.key, torch.cat([want, kb], dim=2))
    a.crop(12)
    torch.testing.assert_close(a.key, want[:, :, :12])
    torch.testing.assert_close(snap.value[:, :, 30:], vb)


def test_decoding_with_gqa_broadcast_equals_repeated_kv():
    """The decode step lets SDPA broadcast the KV heads; logits equal the uncached forward's (which repeats)."""
    model = from_hf_model(tiny_hf_model("llama", seed=2)).eval()
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = RadHybridCache(model.config)
        model(ids[:, :16], cache=cache, use_cache=True)
        steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, 0] for t in range(16, 24)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 16:], rtol=1e-5, atol=1e-5)
