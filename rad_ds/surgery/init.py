"""Initialisations of a new Mamba2 mixer from the attention it replaces (MambaInLlama mapping; which attention
tensors feed it is the model family's ``mamba_sources``, ``rad_ds.models.families``)."""

from __future__ import annotations

import contextlib

import torch

from rad_ds.models.families import FamilyAdapter
from rad_ds.models.mamba2_mixer import Mamba2Mixer

INIT_MODES = ("attention", "attention_skip", "random")


class SurgeryError(ValueError):
    """A replacement request that cannot be carried out; the message says what to change."""


def _gathered(params):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op for ordinary tensors."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def init_from_attention(mixer: Mamba2Mixer, attn, family: FamilyAdapter) -> None:
    """MambaInLlama mapping: x <- V, B <- K, C <- Q, out_proj <- O (weights and biases), the x/B/C sources as
    ``family.mamba_sources`` gives them (Qwen3 folds its q/k norms in: ``rad_ds.models.families.qwen3``)."""
    di, dxb = mixer.d_inner, mixer.d_xb
    rows = {"x": (di, di + dxb), "B": (di + dxb, di + 2 * dxb), "C": (di + 2 * dxb, 2 * di + 2 * dxb)}
    with _gathered(list(attn.parameters())):
        src = family.mamba_sources(attn)
        for name, (lo, hi) in rows.items():
            weight, bias = src[name]
            if weight.shape != mixer.in_proj.weight[lo:hi].shape:
                raise SurgeryError(
                    f"layer {mixer.layer_idx}: {name} rows of in_proj are {tuple(mixer.in_proj.weight[lo:hi].shape)} "
                    f"but the attention projection is {tuple(weight.shape)}"
                )
            mixer.in_proj.weight[lo:hi].copy_(weight)
            if mixer.in_proj.bias is not None:
                if bias is not None:
                    mixer.in_proj.bias[lo:hi].copy_(bias)
                else:
                    mixer.in_proj.bias[lo:hi].zero_()
        mixer.out_proj.weight.copy_(attn.o_proj.weight)
        if mixer.out_proj.bias is not None:
            if attn.o_proj.bias is not None:
                mixer.out_proj.bias.copy_(attn.o_proj.bias)
            else:
                mixer.out_proj.bias.zero_()
    if mixer.in_proj.bias is not None:  # z and dt rows: no bias
        mixer.in_proj.bias[:di].zero_()
        mixer.in_proj.bias[2 * di + 2 * dxb:].zero_()


__all__ = ["INIT_MODES", "SurgeryError", "init_from_attention"]
