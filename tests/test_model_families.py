"""The model-family registry (``rad_ds.models.families``): the one place a HF ``model_type`` meets its adapter.
An unknown type is refused in one line naming the registered ones; a family registered at run time (a toy,
here) goes through ``config_from_hf``, the surgery and the native check without any other file knowing it;
no list of model types exists outside the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig

import rad_ds.models.conversion as conversion
from rad_ds.models import RadHybridConfig, RadHybridForCausalLM
from rad_ds.models import families
from rad_ds.models.families import REGISTRY, FamilyAdapter, UnsupportedModelError, family_of, register
from rad_ds.models.native import NativeExportError, check_native
from rad_ds.surgery import replace_attention
from tests.model_factories import TINY

ROOT = Path(__file__).resolve().parents[1]


class ToyConfig(PretrainedConfig):
    """A config transformers has never heard of, with Llama's field names."""

    model_type = "toy_llama"

    def __init__(self, **kw):
        for k, v in {**TINY, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": True}.items():
            setattr(self, k, kw.pop(k, v))
        super().__init__(**kw)


class Toy(FamilyAdapter):
    """q/k/v biased, o not (as Qwen2); surgery takes B from V and x from K (swapped, so the test can see it was
    this adapter that ran); the native export refuses it."""

    model_type = "toy_llama"
    qkv_bias, out_bias = True, False

    def mamba_sources(self, attn):
        src = super().mamba_sources(attn)
        return {**src, "x": src["B"], "B": src["x"]}

    def native_refusal(self, cfg):
        return "the toy family (native_refusal says so)"


@pytest.fixture
def registry():
    """The registry restored after the test, whatever it registered."""
    saved = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_unknown_model_type_is_one_line_naming_the_registered_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError) as e:
        conversion.config_from_hf(GPT2Config())
    msg = str(e.value)
    assert "\n" not in msg and "'gpt2'" in msg and "docs/extending.md" in msg
    for model_type in REGISTRY:
        assert model_type in msg
    assert conversion.SUPPORTED_MODEL_TYPES == tuple(REGISTRY)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture None"):
        families.family(None)


def test_a_family_registered_at_run_time_imports_replaces_and_is_checked(registry):
    with pytest.raises(UnsupportedModelError, match="'toy_llama'"):
        conversion.config_from_hf(ToyConfig())
    toy = register(Toy())
    assert "toy_llama" in conversion.SUPPORTED_MODEL_TYPES
    cfg = conversion.config_from_hf(ToyConfig())
    assert isinstance(cfg, RadHybridConfig) and cfg.source_model_type == "toy_llama"
    assert (cfg.attention_bias, cfg.attention_out_bias, cfg.qk_norm) == (True, False, False)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 16)
    assert family_of(cfg) is toy

    torch.manual_seed(0)
    model = RadHybridForCausalLM(cfg)
    attn = model.model.layers[1].self_attn
    v, k = attn.v_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    replace_attention(model, [1])
    w, di, dxb = model.model.layers[1].mamba.in_proj.weight, cfg.mamba_d_inner, cfg.mamba_d_xb
    assert torch.equal(w[di:di + dxb], k) and torch.equal(w[di + dxb:di + 2 * dxb], v)  # the toy's mapping ran
    cfg.mamba_proj_bias = cfg.attention_bias = False  # leave only the family's own refusal
    with pytest.raises(NativeExportError, match="the toy family"):
        check_native(cfg)


def test_a_config_saved_before_families_were_recorded():
    cfg = RadHybridConfig(**{**TINY, "rms_norm_eps": 1e-5})
    assert cfg.source_model_type is None and family_of(cfg) is REGISTRY["llama"]
    cfg.qk_norm = True
    with pytest.raises(UnsupportedModelError, match="set source_model_type"):
        family_of(cfg)


def test_every_family_file_is_registered_and_registers_itself_once():
    pkg = ROOT / "rad_ds" / "models" / "families"
    files = sorted(p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "base"))
    modules = {name: getattr(families, name) for name in files}
    assert sorted(f.model_type for f in REGISTRY.values()) == sorted(m.FAMILY.model_type for m in modules.values())
    for model_type, adapter in REGISTRY.items():
        assert adapter.model_type == model_type


# rad_hybrid is the model's own type (configuration_rad_hybrid.py declares it), not a base family
FAMILY_NAMES = {"llama", "mistral", "qwen2", "qwen3"}


def test_no_model_type_list_outside_the_registry():
    """A model type spelled as a string literal anywhere in rad_ds outside ``models/families/`` (or in
    ``config.model_type == ...``) is a second list to keep in step; the families package is the only one."""
    found = []
    for p in sorted((ROOT / "rad_ds").rglob("*.py")):
        if "families" in p.parts:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAMILY_NAMES:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []
