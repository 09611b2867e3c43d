"""The transformers-native export (GraniteMoeHybrid, no remote code) against the rad-ds student it comes from:
fp32 logits to 1e-5 and identical greedy generation, for students imported from Llama (tied, GQA) and Llama 3
(llama3 RoPE scaling, untied), from a student directory and from a distillation checkpoint through the
launcher; what the architecture cannot express (Qwen3's q/k norms included) is refused with one line and nothing
written, and a student tensor the export did not write stops it (named in one line)."""

from __future__ import annotations

import json

import pytest
import torch

from rad_ds.models import RadHybridForCausalLM
from rad_ds.models.conversion import from_hf_model
from rad_ds.models import native
from rad_ds.models.families.qwen3 import Qwen3
from rad_ds.models.native import NativeExportError, _tensor, export_native
from rad_ds.surgery import replace_attention
from tests.distill_helpers import load_launcher, run_args, save_base, write_text_jsonl
from tests.model_factories import tiny_hf_model


def _student(family: str, tmp_path, layers=(1, 2), **overrides):
    model = from_hf_model(tiny_hf_model(family, seed=4, **overrides))
    replace_attention(model, list(layers), seed=1)
    with torch.no_grad():  # move the Mamba2 parameters off their init values so every mapping is exercised
        for name, p in model.named_parameters():
            if ".mamba." in name and ("norm" in name or name.endswith(("D", "dt_bias", "conv1d.bias"))):
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / f"{family}_student"
    model.save_pretrained(out)
    return model.eval(), out


def _native(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)  # no trust_remote_code
    assert type(model).__name__ == "GraniteMoeHybridForCausalLM"
    assert "auto_map" not in json.loads((path / "config.json").read_text())
    assert not list(path.glob("*.py"))  # no model code shipped: transformers' own architecture
    return model.eval()


def _same_model(ours, theirs, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 37), generator=g)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :9]
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), theirs.generate(prompt, **kw))


@pytest.mark.parametrize("family", ["llama", "llama3"])
def test_native_export_equals_the_student(family, tmp_path):
    ours, student_dir = _student(family, tmp_path)
    export_native(student_dir, tmp_path / "native")
    theirs = _native(tmp_path / "native")
    assert theirs.config.layer_types[1:3] == ["linear_attention"] * 2
    _same_model(ours, theirs, ours.config.vocab_size)


def test_native_export_from_a_checkpoint_through_the_launcher(tmp_path, capsys):
    base, data = save_base(tmp_path), write_text_jsonl(tmp_path / "text.jsonl", n=24)
    from rad_ds.distill import distill

    result = distill(load_launcher("distill").make_config(run_args(tmp_path, base, data, tmp_path / "run", steps=2)))
    export = load_launcher("export").main
    assert export(["--checkpoint", str(tmp_path / "run"), "--format", "native", "--out", str(tmp_path / "n")]) == 0
    assert "(native)" in capsys.readouterr().out
    ours = RadHybridForCausalLM.from_pretrained(str(tmp_path / "run" / "final")).eval()
    _same_model(ours, _native(tmp_path / "n"), ours.config.vocab_size)
    assert json.loads((tmp_path / "n" / "rad_ds_native.json").read_text())["step"] == 2
    assert result.export == tmp_path / "run" / "final"


@pytest.mark.parametrize("family, message, overrides", [
    ("qwen2", "attention_bias=True", {}),
    ("mistral", "sliding-window attention", {}),
    ("headdim", "head_dim 32 x 4 heads != hidden size 64", {}),
    ("qwen3", "q/k RMSNorm in attention (Qwen3's q_norm/k_norm, qk_norm=True) on the attention layers [0, 3]",
     {"head_dim": 16}),  # the family's own refusal (FamilyAdapter.native_refusal)
])
def test_what_the_architecture_cannot_express_is_refused(family, message, overrides, tmp_path, capsys):
    _, student_dir = _student(family, tmp_path, **overrides)
    with pytest.raises(NativeExportError, match="export with --format rad_hybrid"):
        export_native(student_dir, tmp_path / "native")
    export = load_launcher("export").main
    rc = export(["--model", str(student_dir), "--format", "native", "--out", str(tmp_path / "n")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and message in line and line.startswith("error:")
    assert not (tmp_path / "n").exists() and not (tmp_path / "native").exists()


def _leave_out_mamba_d(name, src, cfg):
    """The mapping with one student tensor (layer 1's Mamba2 D) deliberately not read: ones written instead."""
    if name == "model.layers.1.mamba.D":
        return torch.ones(src.src.shape(name))
    return _tensor(name, src, cfg)


@pytest.mark.parametrize("case", ["mapping_leaves_one_out", "qk_norm_without_the_refusal"])
def test_every_student_tensor_is_written_or_the_export_stops(case, tmp_path, monkeypatch):
    """A student tensor the export did not write is named in one line and nothing is written: a mapping that
    forgets one (layer 1's D), or a family whose refusal is missing (Qwen3's q/k norms would be dropped)."""
    if case == "mapping_leaves_one_out":
        _, student_dir = _student("llama", tmp_path)
        monkeypatch.setattr(native, "_tensor", _leave_out_mamba_d)
        want = "student tensor model.layers.1.mamba.D has no place in the GraniteMoeHybrid export"
    else:
        _, student_dir = _student("qwen3", tmp_path, head_dim=16)
        monkeypatch.setattr(Qwen3, "native_refusal", lambda self, cfg: None)
        want = "student tensor model.layers.0.self_attn.k_norm.weight (and 3 more) has no place"
    with pytest.raises(NativeExportError) as e:
        export_native(student_dir, tmp_path / "native")
    assert want in str(e.value) and "--format rad_hybrid" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "native").exists()
