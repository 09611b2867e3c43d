"""The hybrid cache: KV for attention layers, conv + SSM state for Mamba2 layers.

Plain tensors per layer, so that speculative decoding can snapshot, truncate and restore it: attention KV
lives in a buffer with spare room (a decode step writes one position in place instead of concatenating the
whole cache) and can be cropped to a length; Mamba2 state cannot be cropped (it is a running summary) and
is restored from a snapshot instead.
"""

from __future__ import annotations

import copy

import torch


class AttentionState:
    """KV of one attention layer in a buffer with spare room: appending a token writes in place (amortised
    O(1)) instead of concatenating the whole cache every step. ``key`` / ``value`` are views of the first
    ``length`` positions. A snapshot shares the buffer copy-on-write: the first append on either side after
    ``share()`` moves that side to a buffer of its own, so neither ever sees the other's tokens."""

    __slots__ = ("_k", "_v", "length", "_shared")
    GROWTH = 4  # spare room on (re)allocation: a quarter of the length (at least 64 positions)

    def __init__(self):
        self._k: torch.Tensor | None = None  # (b, n_kv, capacity, d)
        self._v: torch.Tensor | None = None
        self.length = 0
        self._shared = False

    @property
    def key(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def value(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        if self._k is not None and need <= self._k.size(2) and not self._shared:
            return
        cap = need + max(64, need // self.GROWTH)
        nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        if self.length:
            nk[:, :, : self.length] = self._k[:, :, : self.length]
            nv[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v, self._shared = nk, nv, False

    def update(self, k: torch.Tensor, v: torch.Tensor):
        need = self.length + k.size(2)
        self._reserve(k, v, need)
        self._k[:, :, self.length: need] = k
        self._v[:, :, self.length: need] = v
        self.length = need
        return self.key, self.value

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def share(self) -> "AttentionState":
        """A snapshot of this state (copy-on-write, see the class docstring)."""
        s = AttentionState()
        s._k, s._v, s.length = self._k, self._v, self.length
        s._shared = self._shared = self._k is not None
        return s

    def reorder(self, index: torch.Tensor) -> None:
        if self._k is not None:
            self._k = self._k.index_select(0, index.to(self._k.device))
            self._v = self._v.index_select(0, index.to(self._v.device))
            self._shared = False


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
            layer.crop(length)
        self.seen_tokens = length

    def snapshot(self) -> "RadHybridCache":
        """A copy that shares the attention KV buffers copy-on-write and clones the Mamba2 states."""
        new = copy.copy(self)
        new.layers = []
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                s = layer.share()
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
            if isinstance(layer, AttentionState):
                layer.reorder(beam_idx)
                continue
            for name in layer.__slots__:
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, beam_idx.to(t.device)))

    def __repr__(self):
        return f"RadHybridCache(seen_tokens={self.seen_tokens}, layers={self.layer_types})"
