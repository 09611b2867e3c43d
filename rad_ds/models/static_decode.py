"""Decoding with fixed-shape state, replayable as a CUDA graph.

A decode step with the dynamic ``RadHybridCache`` changes shape every token (the KV grows), which a CUDA graph
cannot capture, and on a GPU a 135M-3B model's decode step is dominated by the launch of a few hundred small
kernels rather than by the bytes it reads. ``StaticDecoder`` allocates the whole decoding state once: per
attention layer a KV buffer of ``max_len`` positions, per Mamba2 layer its conv and SSM state. A step writes the
token's K/V at its position (``index_copy_`` with a device-side position), attends over the whole buffer under a
mask of the positions filled so far, and updates the Mamba2 state in place (``selective_state_update`` and
``causal_conv1d_update`` on CUDA). Every step then has the same shapes and tensor addresses, so on CUDA it is
captured once as a graph and replayed, the discipline of mamba-ssm's own generation
(``mamba_ssm.utils.generation``). ``graph=False`` (and any CPU) runs the same step eagerly.

Greedy output equals the uncached forward's argmax loop token for token (``tests/test_static_decode.py``).
Rows of one batch share a length (no padding); ``RadHybridForCausalLM.generate`` covers everything else.
"""

from __future__ import annotations

import torch

from .hybrid_cache import MambaState, RadHybridCache


class _StaticKV:
    """One attention layer's KV buffer ``(b, n_kv, max_len, d)``; ``update`` writes at the shared position."""

    __slots__ = ("key", "value", "pos")

    def __init__(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor):
        self.key, self.value, self.pos = key, value, pos

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.key.index_copy_(2, self.pos.view(1), k)
        self.value.index_copy_(2, self.pos.view(1), v)
        return self.key, self.value


class StaticDecoder:
    """Prefill once, then decode one token per ``step`` with state allocated up front (see the module doc).

    ``model``: a ``RadHybridForCausalLM`` in eval mode. ``graph``: capture the step as a CUDA graph (default: on
    CUDA). ``max_len``: prompt + new tokens, the KV buffers' length."""

    def __init__(self, model, batch_size: int, max_len: int, graph: bool | None = None):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.batch_size, self.max_len = model.eval(), batch_size, max_len
        self.device, self.dtype = p.device, p.dtype
        self.graph = self.device.type == "cuda" if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise ValueError("graph=True needs the model on a CUDA device; use graph=False on CPU")
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        kw = {"device": self.device}
        self.pos = torch.zeros((), dtype=torch.long, **kw)  # the position the next step writes
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, **kw)
        self.positions = torch.arange(max_len, **kw)
        self.states = []
        for layer in model.model.layers:
            if layer.layer_type == "attention":
                a = layer.self_attn
                shape = (batch_size, a.num_kv_heads, max_len, a.head_dim)
                self.states.append(_StaticKV(torch.zeros(shape, dtype=self.dtype, **kw),
                                             torch.zeros(shape, dtype=self.dtype, **kw), self.pos))
            else:
                m = layer.mamba
                s = MambaState()
                s.conv_state = torch.zeros(batch_size, m.conv_dim, m.d_conv - 1, dtype=self.dtype, **kw)
                s.ssm_state = torch.zeros(batch_size, m.nheads, m.headdim, m.d_state, dtype=torch.float32, **kw)
                self.states.append(s)
        self._graph = None
        self._out: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens in the state (prompt + decoded)."""
        return int(self.pos)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``(batch_size, L)`` through the model's own forward and load its state into the static
        buffers; returns the last position's logits ``(batch_size, vocab)``."""
        b, length = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"prefill got a batch of {b}; this decoder was built for {self.batch_size}")
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no room in max_len={self.max_len}; build the "
                             "decoder with max_len >= prompt + new tokens")
        cache = RadHybridCache(self.model.config)
        out = self.model(input_ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=1)
        for static, layer in zip(self.states, cache.layers):
            if isinstance(static, _StaticKV):
                static.key[:, :, :length].copy_(layer.key)
                static.value[:, :, :length].copy_(layer.value)
            else:
                static.conv_state.copy_(layer.conv_state)
                static.ssm_state.copy_(layer.ssm_state)
        self.pos.fill_(length)
        return out.logits[:, -1]

    def _forward_step(self) -> torch.Tensor:
        """The decode step on the static state: reads ``tokens`` and ``pos``, returns logits ``(b, vocab)``."""
        m = self.model.model
        h = m.embed_tokens(self.tokens)
        cos, sin = m.rotary_emb(h, self.pos.view(1, 1).expand(self.batch_size, 1))
        visible = self.positions <= self.pos
        if self.window:
            visible = visible & (self.positions > self.pos - self.window)
        mask = visible.view(1, 1, 1, -1)
        for layer, state in zip(m.layers, self.states):
            h = layer(h, position_embeddings=(cos, sin), attn_mask=mask, cache=state)
        return self.model.lm_head(m.norm(h))[:, -1]

    def _mamba_states(self) -> list[torch.Tensor]:
        return [t for s in self.states if isinstance(s, MambaState) for t in (s.conv_state, s.ssm_state)]

    def _capture(self) -> None:
        """Warm up on a side stream (Triton autotuning, allocator), put the state back, capture one step."""
        saved = [t.clone() for t in self._mamba_states()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward_step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(self._mamba_states(), saved):
            t.copy_(s)  # the warm-up advanced the Mamba2 state; the KV it wrote at pos is rewritten by the step
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._forward_step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens (batch_size,)`` at the current position; returns the next logits ``(b, vocab)``."""
        if int(self.pos) >= self.max_len:
            raise RuntimeError(f"the decoder is full (max_len={self.max_len}); build it with a larger max_len")
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        if self.graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            out = self._out.clone()
        else:
            out = self._forward_step()
        self.pos += 1
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
        """Greedy decoding: ``(batch_size, L + new)`` ids; rows that reached ``eos_token_id`` keep emitting it, and
        decoding stops once every row has."""
        logits = self.prefill(input_ids)
        out = [input_ids.to(self.device)]
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.step(nxt)
        return torch.cat(out, dim=1)
