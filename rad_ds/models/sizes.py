"""Parameter counts of a hybrid model from its config alone (built on the meta device: no memory, no weights)."""

from __future__ import annotations

import copy

import torch

from .modeling_rad_hybrid import RadDecoderLayer, RadHybridForCausalLM


def param_count(config) -> int:
    """Parameters of a RadHybridForCausalLM of ``config`` (tied embeddings once), counted on the meta device."""
    with torch.device("meta"):
        model = RadHybridForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def layer_elements(config) -> int:
    """Parameters of the largest decoder layer of ``config`` (attention or Mamba2 mixer, MLP, norms)."""
    sizes = []
    for kind in ("attention", "mamba2"):  # a base's attention layers become mixers in its student
        one = copy.deepcopy(config)
        one.layer_types = [kind] * one.num_hidden_layers
        with torch.device("meta"):
            sizes.append(sum(p.numel() for p in RadDecoderLayer(one, 0).parameters()))
    return max(sizes)


__all__ = ["layer_elements", "param_count"]
