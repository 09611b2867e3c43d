"""Layer skipping: the draft model is the same weights with a set of attention sublayers skipped.

The residual passes through a skipped sublayer and its MLP still runs (``skip_layers`` of
``RadHybridForCausalLM.forward``). Mamba2 layers are never candidates. ``PrefixRunner`` evaluates many
masks over fixed sequences cheaply: layers before a mask's first skipped layer compute exactly what the
full model computes, so their outputs are cached once and each draft starts from there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rad_ds.core.layers import attention_layers
from rad_ds.models.modeling_rad_hybrid import _build_attn_mask


def candidate_layers(config) -> list[int]:
    """Attention layers: the only sublayers a draft may skip."""
    return attention_layers(config)


def check_mask(config, mask: Iterable[int]) -> frozenset[int]:
    mask = frozenset(int(i) for i in mask)
    cands = set(candidate_layers(config))
    bad = sorted(mask - cands)
    if bad:
        raise ValueError(f"skip mask {sorted(mask)}: layer(s) {bad} are not attention layers of this model")
    return mask


def topk_mask(z: dict[int, float] | list[float], candidates: list[int], k: int) -> frozenset[int]:
    """The paper's top-k step: skip the k candidate layers with the largest z (ties: lower index first)."""
    vals = z if isinstance(z, dict) else dict(zip(candidates, z))
    order = sorted(candidates, key=lambda i: (-vals[i], i))
    return frozenset(order[:k])


class PrefixRunner:
    """Runs the model over fixed token sequences for many skip masks, reusing the unskipped prefix.

    ``hidden[s][i]`` is the input of layer ``i`` for sequence ``s`` under the full model (computed once).
    ``logits(mask)`` returns, per sequence, the draft's logits at every position; bit-identical to
    ``model(ids, skip_layers=mask).logits`` because the same modules see the same inputs."""

    def __init__(self, model, sequences: list[torch.Tensor]):
        self.model = model
        self.inner = model.model
        self.sequences = sequences
        self.hidden: list[list[torch.Tensor]] = []
        self.pos: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.masks: list[torch.Tensor | None] = []
        with torch.no_grad():
            for ids in sequences:
                ids = ids.view(1, -1).to(model.device)
                h = self.inner.embed_tokens(ids)
                pid = torch.arange(ids.size(1), device=ids.device)[None]
                pe = self.inner.rotary_emb(h, pid)
                am = _build_attn_mask(None, 1, ids.size(1), 0, ids.device, model.config.sliding_window)
                states = [h]
                for layer in self.inner.layers:
                    h = layer(h, position_embeddings=pe, attn_mask=am)
                    states.append(h)
                self.hidden.append(states)
                self.pos.append(pe)
                self.masks.append(am)

    def _head(self, h: torch.Tensor, start: int, index: torch.Tensor | None) -> torch.Tensor:
        h = h[0, start:] if index is None else h[0, index]
        return self.model.lm_head(self.inner.norm(h))

    def full_logits(self, s: int, start: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self._head(self.hidden[s][-1], start, index)

    @torch.no_grad()
    def logits(self, s: int, mask: frozenset[int], start: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits (T - start, V) at positions ``start..`` of sequence ``s`` (or at the positions ``index``)
        with attention sublayers ``mask`` skipped (the LM head, a large share of a small model's cost, runs only
        where needed)."""
        if not mask:
            return self.full_logits(s, start, index)
        first = min(mask)
        h = self.hidden[s][first]
        pe, am = self.pos[s], self.masks[s]
        for i in range(first, len(self.inner.layers)):
            h = self.inner.layers[i](h, position_embeddings=pe, attn_mask=am, skip_mixer=i in mask)
        return self._head(h, start, index)
