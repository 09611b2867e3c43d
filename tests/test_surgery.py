"""Attention -> Mamba2 surgery: exact weight mapping, untouched layers, training, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rad_ds.models import RadHybridForCausalLM
from rad_ds.models.conversion import from_hf_model
from rad_ds.surgery import SurgeryError, layers_from_report, parse_layers, replace_attention
from tests.model_factories import save_tiny, tiny_hf_model
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def _base(family="qwen2"):
    return from_hf_model(tiny_hf_model(family))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mambainllama_mapping_is_exact(family):
    """GQA (4 query heads, 2 KV heads): x <- V, B <- K, C <- Q, out_proj <- O, biases too."""
    model = _base(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = replace_attention(model, [1, 2])
    assert record.layers == [1, 2] and record.init == "attention"
    cfg = model.config
    di, dxb, nh = cfg.mamba_d_inner, cfg.mamba_d_xb, cfg.num_attention_heads
    assert (di, dxb) == (4 * 16, 2 * 16)
    for i in (1, 2):
        m = model.model.layers[i].mamba
        w = m.in_proj.weight
        assert w.shape == (2 * di + 2 * dxb + nh, cfg.hidden_size)
        p = f"model.layers.{i}.self_attn."
        assert torch.equal(w[di:di + dxb], before[p + "v_proj.weight"])
        assert torch.equal(w[di + dxb:di + 2 * dxb], before[p + "k_proj.weight"])
        assert torch.equal(w[di + 2 * dxb:2 * di + 2 * dxb], before[p + "q_proj.weight"])
        assert torch.equal(m.out_proj.weight, before[p + "o_proj.weight"])
        if family == "qwen2":  # q/k/v biases map onto x/B/C rows; z and dt rows carry none
            b = m.in_proj.bias
            assert torch.equal(b[di:di + dxb], before[p + "v_proj.bias"])
            assert torch.equal(b[di + dxb:di + 2 * dxb], before[p + "k_proj.bias"])
            assert torch.equal(b[di + 2 * dxb:2 * di + 2 * dxb], before[p + "q_proj.bias"])
            assert torch.count_nonzero(b[:di]) == 0 and torch.count_nonzero(b[2 * di + 2 * dxb:]) == 0
        else:
            assert m.in_proj.bias is None
        # Mamba2's init: dt = softplus(dt_bias) in [1e-3, 1e-1], A = exp(A_log) in [1, 16], D = 1
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        a = torch.exp(m.A_log)
        assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 0
        assert torch.equal(m.D, torch.ones_like(m.D))
        # z rows and conv: Mamba2's own (PyTorch default) init, not copied from anywhere
        bound = 1 / math.sqrt(cfg.hidden_size)
        assert w[:di].abs().max() <= bound and w[:di].std() > bound / 4
        assert not hasattr(model.model.layers[i], "self_attn")
    assert model.config.layer_types == ["attention", "mamba2", "mamba2", "attention"]
    assert model.config.replaced_layers["layers"] == [1, 2]


def test_untouched_parameters_bit_identical():
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_attention(model, [2])
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("model.layers.2.self_attn."):
            assert k not in after
            continue
        assert torch.equal(v, after[k]), k  # other layers, embeddings, and the MLP/norms of layer 2
    new = [k for k in after if k not in before]
    assert new and all(k.startswith("model.layers.2.mamba.") for k in new)


def test_random_init_ablation_and_seed():
    a, b, c = _base(), _base(), _base()
    replace_attention(a, [1], init="random", seed=3)
    replace_attention(b, [1], init="random", seed=3)
    replace_attention(c, [1], init="attention", seed=3)
    wa, wb, wc = (m.model.layers[1].mamba.in_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)  # seeded
    assert not torch.equal(wa, wc)
    assert torch.equal(wa[:64], wc[:64])  # z rows share the standard init for the same seed


def test_student_trains_only_ssm_and_loss_falls():
    torch.manual_seed(0)
    model = _base("llama")
    replace_attention(model, [1, 2])
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(".mamba." in n)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, 320, (4, 32))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9 and losses[-1] == min(losses), losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_check_errors():
    model = _base()
    with pytest.raises(SurgeryError, match="out of range"):
        replace_attention(model, [4])
    with pytest.raises(SurgeryError, match="more than once"):
        replace_attention(model, [1, 1])
    with pytest.raises(SurgeryError, match="allow-all"):
        replace_attention(model, [0, 1, 2, 3])
    replace_attention(model, [1])
    with pytest.raises(SurgeryError, match="already mamba2"):
        replace_attention(model, [1, 2])
    assert model.config.layer_types == ["attention", "mamba2", "attention", "attention"]
    replace_attention(model, [0, 2, 3], allow_all=True)
    assert model.config.layer_types == ["mamba2"] * 4
    assert model.config.replaced_layers["layers"] == [0, 1, 2, 3]
    with pytest.raises(SurgeryError, match="not a layer index"):
        parse_layers("3,x")
    assert parse_layers("1,4-6") == [1, 4, 5, 6]


def _run_replace(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "replace.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_launcher_end_to_end(tmp_path):
    """The real command: writes a loadable student and its record; the student equals in-process surgery."""
    base, _ = save_tiny(tmp_path, "llama3")
    out = tmp_path / "student"
    r = _run_replace("--model", base, "--layers", "1,3", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "replacement.json").read_text())
    assert record["layers"] == [1, 3] and record["init"] == "attention_skip"  # the command's default
    student = RadHybridForCausalLM.from_pretrained(out)
    assert student.config.layer_types == ["attention", "mamba2", "attention", "mamba2"]
    assert student.config.replaced_layers["layers"] == [1, 3]
    ref = from_hf_model(tiny_hf_model("llama3"))
    replace_attention(ref, [1, 3], init="attention_skip")
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, ref(ids).logits)

    # bad input: non-zero exit, one clear line, nothing written
    cases = [
        (["--layers", "1,9"], "out of range"),
        (["--layers", "1,1"], "more than once"),
        (["--layers", "0,1,2,3"], "allow-all"),
        (["--layers", "x"], "not a list of integers"),
    ]
    for extra, msg in cases:
        bad = tmp_path / "bad"
        r = _run_replace("--model", base, *extra, "--out", bad)
        assert r.returncode != 0 and msg in r.stderr, (extra, r.stderr[-1000:])
        assert r.stderr.strip().splitlines()[-1].startswith("error:")
        assert not bad.exists()
    r = _run_replace("--model", out, "--layers", "1", "--out", tmp_path / "bad")
    assert r.returncode != 0 and "already mamba2" in r.stderr
    assert not (tmp_path / "bad").exists()
    # an existing student is never overwritten by accident
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    r = _run_replace("--model", base, "--layers", "2", "--out", out)
    assert r.returncode != 0 and "--overwrite" in r.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_layers_from_report(tmp_path):
    model = _base()
    rep = {
        "model": "tiny", "num_hidden_layers": 4,
        "layers": [{"index": i, "type": "attention", "redundancy": 0.1 * i} for i in range(4)],
        "selections": [{"k": 1, "layers": [3]}, {"k": 2, "layers": [2, 3]}],
    }
    p = tmp_path / "report.json"
    p.write_text(json.dumps(rep))
    layers, prov = layers_from_report(p, 2, model.config)
    assert layers == [2, 3] and prov["k"] == 2
    with pytest.raises(SurgeryError, match="available k"):
        layers_from_report(p, 3, model.config)
    rep["num_hidden_layers"] = 30
    rep["layers"] = [{"index": i, "type": "attention"} for i in range(30)]
    p.write_text(json.dumps(rep))
    with pytest.raises(SurgeryError, match="made for model"):
        layers_from_report(p, 2, model.config)
    p.write_text("{not json")
    with pytest.raises(SurgeryError, match="not valid JSON"):
        layers_from_report(p, 2, model.config)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_surgery_on_zero3_partitioned_model(family, tmp_path):
    """Under deepspeed.zero.Init the attention weights are partitioned (empty locally); surgery gathers
    them (Qwen3's q/k norms too, folded into B/C) and produces the same mixer as on the plain model."""
    code = """
import os, sys, datetime, torch, deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
from rad_ds.models import RadHybridForCausalLM
from rad_ds.models.conversion import config_from_hf, from_hf_model
from rad_ds.surgery import replace_attention
from tests.model_factories import tiny_hf_model
src = tiny_hf_model(sys.argv[2])
cfg = config_from_hf(src.config)
ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
    model = RadHybridForCausalLM(cfg)
sd = src.state_dict()
for n, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        p.data.copy_(sd[n])
assert model.model.layers[1].self_attn.v_proj.weight.numel() == 0  # partitioned
replace_attention(model, [1])
whole = from_hf_model(tiny_hf_model(sys.argv[2]))
replace_attention(whole, [1])
for n, p in whole.model.layers[1].mamba.named_parameters():
    assert torch.equal(dict(model.model.layers[1].mamba.named_parameters())[n], p), n
if sys.argv[2] == "llama":
    w = model.model.layers[1].mamba.in_proj.weight
    assert torch.equal(w[64:96], sd["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(w[96:128], sd["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(w[128:192], sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.model.layers[1].mamba.out_proj.weight, sd["model.layers.1.self_attn.o_proj.weight"])
print("ZERO3-SURGERY-OK")
"""
    r = subprocess.run([sys.executable, "-c", code, str(free_port()), family], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert "ZERO3-SURGERY-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
