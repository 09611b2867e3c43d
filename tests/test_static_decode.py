"""The fixed-shape decoder (``StaticDecoder``): its greedy output against the uncached forward's argmax loop, its
logits against the full forward, the sliding window, refusals; on CUDA the captured graph against both."""

from __future__ import annotations

import pytest
import torch

from rad_ds.models.conversion import from_hf_model
from rad_ds.models.static_decode import StaticDecoder
from rad_ds.surgery import replace_attention
from tests.helpers import cuda_with_kernels
from tests.model_factories import tiny_hf_model


def _model(family="llama3", layers=(0, 2)):
    model = from_hf_model(tiny_hf_model(family))
    if layers:
        replace_attention(model, list(layers))
    with torch.no_grad():  # non-trivial SSM parameters, so that the state matters
        for layer in model.model.layers:
            if layer.layer_type == "mamba2":
                layer.mamba.out_proj.weight.mul_(4.0)
                layer.mamba.D.add_(torch.randn_like(layer.mamba.D))
    return model.eval()


def argmax_loop(model, ids, new: int):
    """The oracle: the whole sequence through the uncached forward for every new token."""
    with torch.no_grad():
        for _ in range(new):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("family,layers", [("llama3", (0, 2)), ("llama", ()), ("qwen2", (1, 2, 3))])
def test_greedy_equals_uncached_argmax_loop(family, layers):
    model = _model(family, layers)
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    dec = StaticDecoder(model, batch_size=2, max_len=48)
    assert dec.graph is False  # CPU: eager
    out = dec.generate(ids, max_new_tokens=30)
    assert torch.equal(out, argmax_loop(model, ids, 30))
    assert dec.length == 11 + 29  # the last token is emitted, not fed back


def test_step_logits_equal_full_forward_and_state_stays_in_place():
    model = _model()
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    dec = StaticDecoder(model, batch_size=2, max_len=64)
    addresses = [t.data_ptr() for s in dec.states for t in
                 ((s.key, s.value) if hasattr(s, "key") else (s.conv_state, s.ssm_state))]
    with torch.no_grad():
        full = model(ids).logits
        got = [dec.prefill(ids[:, :25])]
        for t in range(25, 40):
            got.append(dec.step(ids[:, t]))
    # the step at position t predicts t + 1: compare with the full forward at positions 24..39
    assert (torch.stack(got, 1) - full[:, 24:40]).abs().max() <= 1e-4
    assert addresses == [t.data_ptr() for s in dec.states for t in
                         ((s.key, s.value) if hasattr(s, "key") else (s.conv_state, s.ssm_state))]


def test_sliding_window_is_applied():
    model = _model("mistral", (1,))
    assert model.config.sliding_window == 8
    ids = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(3))
    out = StaticDecoder(model, batch_size=1, max_len=40).generate(ids, max_new_tokens=25)
    assert torch.equal(out, argmax_loop(model, ids, 25))  # 30 tokens: far past the window


def test_eos_stops_rows():
    model = _model()
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(4))
    ref = argmax_loop(model, ids, 12)
    eos = int(ref[0, 6 + 3])  # row 0 emits it as its 4th new token
    out = StaticDecoder(model, batch_size=2, max_len=24).generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out[0, : 6 + 4], ref[0, : 6 + 4]) and (out[0, 6 + 4:] == eos).all()


def test_refusals():
    model = _model()
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, batch_size=1, max_len=8).prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        StaticDecoder(model, batch_size=2, max_len=8).prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, batch_size=1, max_len=8, graph=True)
    dec = StaticDecoder(model, batch_size=1, max_len=5)
    dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    dec.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="full"):
        dec.step(torch.zeros(1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_equals_eager(dtype):
    cuda_with_kernels()  # skips without CUDA; with CUDA, kernels that do not import fail the test
    model = _model().to("cuda", dtype)
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1)).cuda()
    graphed = StaticDecoder(model, batch_size=2, max_len=64)
    assert graphed.graph is True
    eager = StaticDecoder(model, batch_size=2, max_len=64, graph=False)
    a, b = graphed.generate(ids, max_new_tokens=40), eager.generate(ids, max_new_tokens=40)
    assert torch.equal(a, b)
    if dtype == torch.float32:
        assert torch.equal(a, argmax_loop(model, ids, 40))


def test_generate_cli_static_equals_generate(tmp_path, capsys):
    """``launchers/generate.py --static`` prints what the default (transformers' generate) prints."""
    from rad_ds.decoding import cli
    from tests.model_factories import save_tiny_with_tokenizer

    path, _ = save_tiny_with_tokenizer(tmp_path)
    texts = []
    for extra in ([], ["--static"]):
        assert cli.main(["--model", str(path), "--prompt", "hello there", "--max-new-tokens", "12", *extra]) == 0
        out = capsys.readouterr().out
        texts.append(out.split(">>> hello there\n", 1)[1].rsplit("\n[", 1)[0])
    assert texts[0] == texts[1] and texts[0].strip()
