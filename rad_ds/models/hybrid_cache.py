"""The hybrid cache: KV for attention layers, conv + SSM state for Mamba2 layers.

Kept deliberately simple (plain tensors per layer) so that speculative decoding can snapshot,
truncate and restore it: attention KV can be cropped to a length; Mamba2 state cannot be cropped
(it is a running summary) and is restored from a snapshot instead.
"""

from __future__ import annotations

import copy

import torch


class AttentionState:
    __slots__ = ("key", "value")

    def __init__(self):
        self.key: torch.Tensor | None = None  # (b, n_kv, T, d)
        self.value: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor):
        if self.key is None:
            self.key, self.value = k, v
        else:
            self.key = torch.cat([self.key, k], dim=2)
            self.value = torch.cat([self.value, v], dim=2)
        return self.key, self.value

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.size(2)


class MambaState:
    __slots__ = ("conv_state", "ssm_state")

    def __init__(self):
        self.conv_state: torch.Tensor | None = None  # (b, conv_dim, d_conv - 1)
        self.ssm_state: torch.Tensor | None = None  # (b, nheads, headdim, d_state), float32


class RadHybridCache:
    """Per-layer state for incremental decoding of a ``RadHybridForCausalLM``."""

    is_compileable = False

    def __init__(self, config):
        self.layer_types = list(config.layer_types)
        self.layers = [AttentionState() if t == "attention" else MambaState() for t in self.layer_types]
        self.seen_tokens = 0
        self.doc_start: torch.Tensor | None = None  # (b,) after a packed prompt: where its last document starts

    def __getitem__(self, idx: int):
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def crop(self, length: int):
        """Keep the first ``length`` tokens. Only possible when the model has no Mamba2 layers;
        otherwise restore a ``snapshot()`` taken at that length."""
        if length >= self.seen_tokens:
            return
        if any(t == "mamba2" for t in self.layer_types):
            raise RuntimeError("a Mamba2 state cannot be cropped; restore a snapshot() instead")
        for layer in self.layers:
            if layer.key is not None:
                layer.key = layer.key[:, :, :length]
                layer.value = layer.value[:, :, :length]
        self.seen_tokens = length

    def snapshot(self) -> "RadHybridCache":
        """A copy that shares the attention KV tensors (they are only ever appended to by
        concatenation, never written in place) and clones the Mamba2 states."""
        new = copy.copy(self)
        new.layers = []
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                s = AttentionState()
                s.key, s.value = layer.key, layer.value
            else:
                s = MambaState()
                s.conv_state = None if layer.conv_state is None else layer.conv_state.clone()
                s.ssm_state = None if layer.ssm_state is None else layer.ssm_state.clone()
            new.layers.append(s)
        return new

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.doc_start is not None:
            self.doc_start = self.doc_start.index_select(0, beam_idx.to(self.doc_start.device))
        for layer in self.layers:
            for name in layer.__slots__:
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, beam_idx.to(t.device)))

    def __repr__(self):
        return f"RadHybridCache(seen_tokens={self.seen_tokens}, layers={self.layer_types})"
