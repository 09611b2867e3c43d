"""A RAD student as an architecture transformers implements itself (no remote code): GraniteMoeHybrid.

vLLM and SGLang run transformers' own architectures, not ``trust_remote_code`` models. A MambaInLlama
student is exactly a GraniteMoeHybrid model with no experts:

* attention layers: the same q/k/v/o projections, GQA and full RoPE (``position_embedding_type="rope"``,
  the student's ``rope_parameters``), ``attention_multiplier = head_dim ** -0.5``;
* Mamba2 layers: the student repeats x and B over the KV groups before its conv, so it is a standard
  Mamba2 with one B/C group per head (``mamba_n_groups = mamba_n_heads``, ``mamba_d_state = head_dim``) once
  the x and B rows of ``in_proj`` are repeated the same way; conv, ``dt_bias``, ``A_log``, ``D`` and the
  gated RMSNorm (per group = per head, norm after the gate) carry over as they are;
* the SwiGLU MLP is the shared MLP (``input_linear`` = [gate; up], ``output_linear`` = down); multipliers
  and logit scaling are 1.

What GraniteMoeHybrid cannot express is refused up front with one line naming the alternative (the
``rad_hybrid`` format, ``--format rad_hybrid``): biases on q/k/v/o, the MLP or the Mamba2 projections, a
sliding window, ``head_dim != hidden_size / num_attention_heads``, a Mamba2 width that is not a whole
multiple of the hidden size, an activation other than SiLU, and what the model family says it lacks
(``FamilyAdapter.native_refusal``: Qwen3's q/k norms). Weights stream one tensor at a time, and every student
tensor must be written (or be a deliberate skip, ``skipped_tensors``): one that is not is named in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from rad_ds.core.io import atomic_dir

from .configuration_rad_hybrid import RadHybridConfig
from .conversion import load_tokenizer
from .families import family_of
from .weights import SafetensorsWriter, WeightSource

NATIVE_FORMATS = ("granitemoehybrid",)
MAMBA = "linear_attention"  # GraniteMoeHybrid's name for a Mamba2 layer


class NativeExportError(ValueError):
    """A student that the native architecture cannot express exactly."""


def _refuse(what: str) -> None:
    raise NativeExportError(f"GraniteMoeHybrid cannot express {what}; export with --format rad_hybrid "
                            "(loads with trust_remote_code=True) instead")


def check_native(cfg: RadHybridConfig) -> None:
    """Refuse what the native architecture cannot express (one line each)."""
    for flag in ("attention_bias", "attention_out_bias", "mlp_bias", "mamba_proj_bias", "mamba_out_bias"):
        if getattr(cfg, flag, False):
            _refuse(f"{flag}=True (biases: e.g. Qwen2's q/k/v biases)")
    if cfg.sliding_window is not None:
        _refuse(f"sliding-window attention (sliding_window={cfg.sliding_window})")
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        _refuse(f"head_dim {cfg.head_dim} x {cfg.num_attention_heads} heads != hidden size {cfg.hidden_size}")
    if cfg.mamba_d_inner % cfg.hidden_size:
        _refuse(f"a Mamba2 width {cfg.mamba_d_inner} that is not a multiple of the hidden size {cfg.hidden_size}")
    if cfg.hidden_act != "silu":
        _refuse(f"hidden_act={cfg.hidden_act!r} (its Mamba2 conv uses the model's activation; rad-ds uses SiLU)")
    reason = family_of(cfg).native_refusal(cfg)
    if reason:
        _refuse(reason)


def granite_config(cfg: RadHybridConfig):
    """The GraniteMoeHybridConfig that computes what the student computes."""
    check_native(cfg)
    heads = cfg.mamba_d_inner // cfg.mamba_headdim
    limit = tuple(cfg.mamba_dt_limit) if cfg.mamba_dt_limit else (0.0, float("inf"))
    return GraniteMoeHybridConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        shared_intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=dict(cfg.rope_parameters), attention_bias=False, attention_dropout=cfg.attention_dropout,
        embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
        attention_multiplier=cfg.head_dim ** -0.5, num_local_experts=0, position_embedding_type="rope",
        layer_types=[MAMBA if t == "mamba2" else "attention" for t in cfg.layer_types],
        mamba_n_heads=heads, mamba_n_groups=heads, mamba_d_state=cfg.mamba_d_state, mamba_d_head=cfg.mamba_headdim,
        mamba_d_conv=cfg.mamba_d_conv, mamba_expand=cfg.mamba_d_inner // cfg.hidden_size,
        mamba_chunk_size=cfg.mamba_chunk_size, mamba_conv_bias=cfg.mamba_conv_bias, mamba_proj_bias=False,
        time_step_limit=limit,
    )


def _repeat_rows(w: torch.Tensor, d_state: int, repeat: int) -> torch.Tensor:
    """Rows grouped per KV head (``n_kv x d_state``) repeated ``repeat`` times each, as the student repeats
    x and B over the KV groups at run time."""
    return w.reshape(-1, d_state, *w.shape[1:]).repeat_interleave(repeat, dim=0).reshape(-1, *w.shape[1:])


def _in_proj(w: torch.Tensor, cfg: RadHybridConfig) -> torch.Tensor:
    di, dxb, ds = cfg.mamba_d_inner, cfg.mamba_d_xb, cfg.mamba_d_state
    z, x, b, c, dt = torch.split(w, [di, dxb, dxb, di, w.shape[0] - 2 * di - 2 * dxb])
    rep = di // dxb
    return torch.cat([z, _repeat_rows(x, ds, rep), _repeat_rows(b, ds, rep), c, dt])


def _tensor(name: str, src: WeightSource, cfg: RadHybridConfig) -> torch.Tensor:
    """The value of GraniteMoeHybrid tensor ``name`` from the student's tensors."""
    if ".shared_mlp.input_linear." in name:
        pre = name.split(".shared_mlp.")[0]
        return torch.cat([src.read(f"{pre}.mlp.gate_proj.weight"), src.read(f"{pre}.mlp.up_proj.weight")])
    if ".shared_mlp.output_linear." in name:
        return src.read(name.split(".shared_mlp.")[0] + ".mlp.down_proj.weight")
    if name.endswith(".mamba.in_proj.weight"):
        return _in_proj(src.read(name), cfg)
    return src.read(name)


class _Reads:
    """A WeightSource that remembers which tensors were read."""

    def __init__(self, src: WeightSource):
        self.src, self.read_names = src, set()

    def read(self, name: str) -> torch.Tensor:
        self.read_names.add(name)
        return self.src.read(name)


def skipped_tensors(cfg: RadHybridConfig) -> set[str]:
    """Student tensors the export leaves out on purpose: a tied LM head is the embedding."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()


def _write_weights(path: Path, layout: dict, src: WeightSource, cfg: RadHybridConfig, dtype) -> None:
    """Every GraniteMoeHybrid tensor of ``layout`` from the student's, one at a time; then every student tensor
    must have been used (or be in ``skipped_tensors``), so nothing is dropped silently (e.g. a q/k norm)."""
    reads = _Reads(src)
    specs = [(n, tuple(t.shape), dtype) for n, t in layout.items()]
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as w:
        for name, shape, _ in specs:
            t = _tensor(name, reads, cfg)
            if tuple(t.shape) != shape:
                raise NativeExportError(f"{src.dir}: {name} maps to shape {tuple(t.shape)}, GraniteMoeHybrid "
                                        f"expects {shape}")
            w.write(name, t)
    unused = sorted(set(src.names()) - reads.read_names - skipped_tensors(cfg))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise NativeExportError(f"{src.dir}: student tensor {unused[0]}{more} has no place in the GraniteMoeHybrid "
                                "export and would be dropped; export with --format rad_hybrid instead")


def export_native(student_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                  extra_files: dict | None = None) -> Path:
    """Write the rad_hybrid student in ``student_dir`` as a GraniteMoeHybrid directory (atomically)."""
    src_dir = Path(student_dir)
    cfg = RadHybridConfig.from_pretrained(str(src_dir))
    gcfg = granite_config(cfg)
    src = WeightSource(src_dir)
    with torch.device("meta"):
        layout = GraniteMoeHybridForCausalLM(gcfg).state_dict()
    if gcfg.tie_word_embeddings:
        layout.pop("lm_head.weight", None)
    dtype = dtype or src.dtype("model.embed_tokens.weight")
    gcfg.dtype = str(dtype).removeprefix("torch.")
    with atomic_dir(out_dir) as tmp:
        _write_weights(tmp / "model.safetensors", layout, src, cfg, dtype)
        gcfg.save_pretrained(str(tmp))
        tok = load_tokenizer(src_dir)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        if (src_dir / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_text((src_dir / "generation_config.json").read_text())
        meta = {"format": "granitemoehybrid", "source": str(src_dir), "mamba_layers": cfg.mamba_layers}
        (tmp / "rad_ds_native.json").write_text(json.dumps({**meta, **(extra_files or {})}, indent=2) + "\n")
    return Path(out_dir)


__all__ = ["NATIVE_FORMATS", "NativeExportError", "check_native", "export_native", "granite_config", "skipped_tensors"]
