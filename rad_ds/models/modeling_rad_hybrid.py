"""RAD hybrid causal LM: Llama-style blocks whose mixer is RoPE/GQA attention or a Mamba2 mixer.

With every layer ``"attention"`` this computes exactly what transformers' Llama / Qwen2 / Qwen3 / Mistral
models compute (same parameter names: ``model.layers.i.self_attn.q_proj`` ...), so their checkpoints
load as all-attention hybrids. Mamba2 layers hold ``model.layers.i.mamba.{in_proj, conv1d, ...}``.

Beyond the usual transformers arguments, ``forward`` takes ``skip_layers``: layer indices whose mixer
is skipped (the residual passes through, the MLP still runs), the draft model of self-speculative
decoding, built without copying weights.

This file is copied next to exported checkpoints (``trust_remote_code``): it imports only torch,
transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_rad_hybrid import RadHybridConfig
from .hybrid_cache import RadHybridCache
from .mamba2_mixer import Mamba2Mixer

try:  # gradient checkpointing support in transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module

try:
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = None


@dataclass
class RadHybridOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: RadHybridCache | None = None
    hidden_states: tuple | None = None
    last_hidden_state: torch.FloatTensor | None = None


class RadRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class RadRotaryEmbedding(nn.Module):
    """RoPE frequencies; non-default types (``llama3``, ``linear``, ``yarn``) come from transformers'
    ``ROPE_INIT_FUNCTIONS`` so they match the source model exactly."""

    def __init__(self, config: RadHybridConfig):
        super().__init__()
        self.config = config
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: RadHybridConfig):
        params = config.rope_parameters or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(
                f"rope_type={rope_type!r} changes with sequence length and is not supported; "
                "supported: default, linear, llama3, yarn"
            )
        if rope_type == "default":
            base = params.get("rope_theta", 10000.0)
            dim = config.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
            return inv_freq, 1.0
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return inv_freq, scaling

    def _apply(self, fn, recurse=True):
        """``inv_freq`` stays float32 through ``model.to(bf16)`` / ``.half()``: in bf16 a Llama-3 table
        (base 500000) is off by more than 0.1 rad at distance 2048 for a quarter of the frequencies."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            with torch.device("cpu"):
                inv_freq, _ = self.compute_inv_freq(self.config)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, x, position_ids):
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # the angles in float32, as transformers
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RadAttention(nn.Module):
    def __init__(self, config: RadHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.n_rep = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attention_out_bias)
        # Qwen3: an RMSNorm over head_dim on each head of q and k, before RoPE
        self.q_norm = RadRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RadRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None

    def forward(self, hidden_states, position_embeddings, attn_mask=None, cache=None):
        b, l, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, l, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v)
        gqa = {}
        if self.n_rep > 1:
            if cache is not None and l == 1:
                gqa = {"enable_gqa": True}  # decoding: broadcast the KV heads instead of copying the whole cache
            else:
                k = k.repeat_interleave(self.n_rep, dim=1)
                v = v.repeat_interleave(self.n_rep, dim=1)
        is_causal = attn_mask is None and l > 1 and k.size(2) == l
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scaling, **gqa,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))


class RadMLP(nn.Module):
    def __init__(self, config: RadHybridConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RadDecoderLayer(_LayerBase):
    def __init__(self, config: RadHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "attention":
            self.self_attn = RadAttention(config, layer_idx)
        else:
            self.mamba = Mamba2Mixer(config, layer_idx)
        self.mlp = RadMLP(config)
        self.input_layernorm = RadRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RadRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.self_attn if self.layer_type == "attention" else self.mamba

    def forward(self, hidden_states, position_embeddings=None, attn_mask=None, padding_mask=None,
                cache=None, skip_mixer: bool = False, seq_idx=None, attention=None):
        """``attention``: an attention module run in place of this layer's own mixer (the one-copy
        self-distillation teacher runs a replaced layer with its original attention this way)."""
        if not skip_mixer:
            x = self.input_layernorm(hidden_states)
            if attention is not None:
                x = attention(x, position_embeddings, attn_mask=attn_mask, cache=cache)
            elif self.layer_type == "attention":
                x = self.self_attn(x, position_embeddings, attn_mask=attn_mask, cache=cache)
            else:
                x = self.mamba(x, cache=cache, attention_mask=padding_mask, seq_idx=seq_idx)
            hidden_states = hidden_states + x
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class RadHybridPreTrainedModel(PreTrainedModel):
    config_class = RadHybridConfig
    config: RadHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RadDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RadRotaryEmbedding):
            # a non-persistent buffer: never in the checkpoint, so it must be recomputed after loading
            with torch.device("cpu"):
                inv_freq, _ = module.compute_inv_freq(module.config)
            if hf_init is not None:
                hf_init.copy_(module.inv_freq, inv_freq.to(module.inv_freq.device))
            else:  # pragma: no cover
                with torch.no_grad():
                    module.inv_freq.copy_(inv_freq)
        elif isinstance(module, Mamba2Mixer):
            # the generic init above leaves dt_bias / A_log meaningless: re-apply Mamba2's init
            # (through transformers' guarded init functions, so loaded weights are never overwritten)
            dt_bias, a_log = module.ssm_init_values()
            if hf_init is not None:
                hf_init.copy_(module.dt_bias, dt_bias.to(module.dt_bias.device))
                hf_init.copy_(module.A_log, a_log.to(module.A_log.device))
                hf_init.ones_(module.D)
            else:  # pragma: no cover
                with torch.no_grad():
                    module.dt_bias.copy_(dt_bias)
                    module.A_log.copy_(a_log)
                    module.D.fill_(1.0)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring RadHybridCache ourselves (prepare_inputs_for_generation)


def _position_ids_from_mask(attention_mask, past: int, length: int):
    """Positions that skip left padding: the first real token is position 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, past:past + length]


def documents_from_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``seq_idx (b, l)``, the document index of each position of packed rows, from ``position_ids`` that
    restart at 0 at every document (transformers' convention, ``DataCollatorWithFlattening``); ``None``
    when no row restarts (one document per row). Rows that restart must start at 0 and count up by one.
    With padding (``attention_mask``), only a restart between two real tokens starts a document: the
    first token after left padding is position 0 without being a new document."""
    restart = position_ids[:, 1:] == 0
    if attention_mask is not None:
        real = attention_mask.bool()
        restart = restart & real[:, 1:] & real[:, :-1]
    if not bool(restart.any()):
        return None
    if attention_mask is not None:
        return F.pad(restart.long(), (1, 0)).cumsum(-1)
    bad_start = (position_ids[:, 0] != 0).nonzero()
    if len(bad_start):
        r = int(bad_start[0, 0])
        raise ValueError(f"position_ids of packed rows must start at 0 in every row; row {r} starts at "
                         f"{int(position_ids[r, 0])}")
    ok = (position_ids[:, 1:] == position_ids[:, :-1] + 1) | restart
    if not bool(ok.all()):
        r, t = (int(v) for v in (~ok).nonzero()[0])
        raise ValueError(f"position_ids must count up by one inside a document and restart at 0 for the next; "
                         f"row {r} goes from {int(position_ids[r, t])} to {int(position_ids[r, t + 1])} at {t + 1}")
    return F.pad(restart.long(), (1, 0)).cumsum(-1)


def _last_document_start(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b,) index of the first position of each row's last document."""
    return (seq_idx != seq_idx[:, -1:]).sum(-1)


def _build_attn_mask(attention_mask, b, q_len, past, device, sliding_window=None, dtype=torch.bool, seq_idx=None):
    """Boolean (b, 1, q, k) mask, True = attend; ``None`` when plain causal attention is exact. With
    ``seq_idx`` (packed rows, no cache) attention is block-diagonal: a document sees only itself."""
    k_len = past + q_len
    if attention_mask is None and sliding_window is None and seq_idx is None and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None].expand(b, 1, q_len, k_len)
    if seq_idx is not None:
        mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :k_len].bool()
        # a padded query row would see nothing and give NaN; let it see everything (its output is unused)
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | empty
    return mask


class RadHybridModel(RadHybridPreTrainedModel):
    def __init__(self, config: RadHybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RadDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RadRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RadRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _masks(self, attention_mask, position_ids, cache, past: int, b: int, l: int, device):
        """(padding mask or None, position_ids, attention mask or None, seq_idx or None) of one forward."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D (batch, past + new tokens), 1 = real token, 0 = padding")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: take the fast causal path
        seq_idx = self._documents(position_ids, attention_mask, past, cache)
        if past and cache is not None and getattr(cache, "doc_start", None) is not None and position_ids is None:
            # decoding after a packed prompt: only its last document is context (as if the rest were padding)
            keep = torch.arange(past + l, device=device)[None] >= cache.doc_start[:, None]
            attention_mask = keep if attention_mask is None else attention_mask.bool() & keep
        if position_ids is None:
            if attention_mask is not None:
                position_ids = _position_ids_from_mask(attention_mask, past, l)
            else:
                position_ids = torch.arange(past, past + l, device=device)[None].expand(b, l)
        attn_mask = _build_attn_mask(attention_mask, b, l, past, device, self.config.sliding_window, seq_idx=seq_idx)
        return attention_mask, position_ids, attn_mask, seq_idx

    def layer_inputs(self, inputs_embeds, position_ids=None) -> dict:
        """The keyword arguments every decoder layer takes in an uncached forward over ``inputs_embeds``
        (RoPE tables, attention mask, document boundaries), for callers that run the layers themselves."""
        b, l, _ = inputs_embeds.shape
        _, position_ids, attn_mask, seq_idx = self._masks(None, position_ids, None, 0, b, l, inputs_embeds.device)
        return {"position_embeddings": self.rotary_emb(inputs_embeds, position_ids), "attn_mask": attn_mask,
                "seq_idx": seq_idx}

    @staticmethod
    def _documents(position_ids, attention_mask, past: int, cache):
        """``seq_idx`` of packed rows (see ``documents_from_positions``), checked against the other inputs."""
        if position_ids is None:
            return None
        mask = attention_mask[:, -position_ids.size(1):] if attention_mask is not None else None
        seq_idx = documents_from_positions(position_ids, mask)
        if seq_idx is None:
            return None
        if past:
            raise ValueError("packed rows (position_ids restarting at 0) need an empty cache")
        if cache is not None:
            cache.doc_start = _last_document_start(seq_idx)
        return seq_idx

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: RadHybridCache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        skip_layers=None,
        **kwargs,
    ) -> RadHybridOutput:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, l, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = RadHybridCache(self.config)
        past = cache.seen_tokens if cache is not None else 0
        attention_mask, position_ids, attn_mask, seq_idx = self._masks(
            attention_mask, position_ids, cache, past, b, l, inputs_embeds.device)
        pos_emb = self.rotary_emb(inputs_embeds, position_ids)
        skip = frozenset(skip_layers or ())

        h = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(h)
            h = layer(
                h, position_embeddings=pos_emb, attn_mask=attn_mask, padding_mask=attention_mask,
                cache=cache[i] if cache is not None else None, skip_mixer=i in skip, seq_idx=seq_idx,
            )
        h = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(h)
        if cache is not None:
            cache.seen_tokens = past + l
        return RadHybridOutput(
            last_hidden_state=h, cache=cache if use_cache or cache is not None else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class RadHybridForCausalLM(RadHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RadHybridConfig):
        super().__init__(config)
        self.model = RadHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: RadHybridCache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        skip_layers=None,
        **kwargs,
    ) -> RadHybridOutput:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            skip_layers=skip_layers,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        result = RadHybridOutput(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
        )
        if return_dict is False:
            return result.to_tuple()
        return result

    # -- generation ---------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=True, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if use_cache is not False and cache is None:
            cache = RadHybridCache(self.config)
        past = cache.seen_tokens if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "cache": cache, "use_cache": use_cache is not False}
        if past == 0 and kwargs.get("position_ids") is not None:  # a packed prompt (several documents)
            inputs["position_ids"] = kwargs["position_ids"]
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            # under synced_gpus a rank that has finished keeps stepping with no new token (its cache has seen
            # them all): it feeds its last token again, and generate() discards what comes out
            fresh = input_ids[:, past:] if past < input_ids.size(1) else input_ids[:, -1:]
            inputs["input_ids"] = fresh if cache is not None else input_ids
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs.pop("past_key_values", None)
        model_kwargs["cache"] = outputs.get("cache")
        model_kwargs.pop("position_ids", None)  # recomputed from the mask and the cache length
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


__all__ = ["RadHybridForCausalLM", "RadHybridModel", "RadHybridPreTrainedModel"]
