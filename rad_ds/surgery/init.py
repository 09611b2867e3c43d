"""Initialisations of a new Mamba2 mixer from the attention it replaces (MambaInLlama mapping)."""

from __future__ import annotations

import contextlib

import torch

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
def init_from_attention(mixer: Mamba2Mixer, attn) -> None:
    """MambaInLlama mapping: x <- V, B <- K, C <- Q, out_proj <- O (weights and biases)."""
    di, dxb = mixer.d_inner, mixer.d_xb
    rows = {"x": (di, di + dxb), "B": (di + dxb, di + 2 * dxb), "C": (di + 2 * dxb, 2 * di + 2 * dxb)}
    src = {"x": attn.v_proj, "B": attn.k_proj, "C": attn.q_proj}
    with _gathered(list(attn.parameters())):
        for name, (lo, hi) in rows.items():
            lin = src[name]
            if lin.weight.shape != mixer.in_proj.weight[lo:hi].shape:
                raise SurgeryError(
                    f"layer {mixer.layer_idx}: {name} rows of in_proj are {tuple(mixer.in_proj.weight[lo:hi].shape)} "
                    f"but the attention projection is {tuple(lin.weight.shape)}"
                )
            mixer.in_proj.weight[lo:hi].copy_(lin.weight)
            if mixer.in_proj.bias is not None:
                if lin.bias is not None:
                    mixer.in_proj.bias[lo:hi].copy_(lin.bias)
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
