"""What rad-ds needs to know about a base model family: ``FamilyAdapter``, one subclass per HF ``model_type``.

An adapter says how a transformers config maps onto a ``RadHybridConfig`` (the all-attention hybrid that
computes what the source computes), which attention features the family has (q/k/v/o biases, one sliding
window for every layer, q/k RMSNorm), which attention tensors feed the Mamba2 init of a replaced layer
(``mamba_sources``) and whether the transformers-native export can express the family (``native_refusal``).
The base class is the Llama mapping; a family overrides only where it differs.
"""

from __future__ import annotations

import torch

from ..configuration_rad_hybrid import RadHybridConfig

# fields with the same name and meaning in every Llama-style transformers config
COPIED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
)


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture rad-ds cannot import exactly."""


class FamilyAdapter:
    """A base model family (Llama's mapping; subclasses override what differs).

    ``qkv_bias`` / ``out_bias``: ``None`` reads the source config's ``attention_bias`` (Llama, Mistral, Qwen3:
    one flag for q/k/v/o); a bool fixes it (Qwen2: q/k/v biased, o not). ``window_flag``: the config field that
    switches the sliding window on (Qwen2/3's ``use_sliding_window``), ``None`` when ``sliding_window`` alone
    decides. ``qk_norm``: RMSNorm over ``head_dim`` on q and k before RoPE (Qwen3)."""

    model_type: str = ""
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    window_flag: str | None = None
    qk_norm: bool = False

    def config(self, src) -> RadHybridConfig:
        """A RadHybridConfig with every layer ``"attention"`` that reproduces the source config ``src``."""
        return RadHybridConfig(**self.config_kwargs(src))

    def config_kwargs(self, src) -> dict:
        kw = {k: getattr(src, k) for k in COPIED_FIELDS if hasattr(src, k)}
        kw["head_dim"] = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
        kw["rope_parameters"] = rope_parameters(src)
        bias = bool(getattr(src, "attention_bias", False))
        kw["attention_bias"] = bias if self.qkv_bias is None else self.qkv_bias
        kw["attention_out_bias"] = kw["attention_bias"] if self.out_bias is None else self.out_bias
        kw["mlp_bias"] = bool(getattr(src, "mlp_bias", False))
        kw["sliding_window"] = self.window(src)
        kw["qk_norm"] = self.qk_norm
        kw["source_model_type"] = self.model_type
        kw["layer_types"] = ["attention"] * src.num_hidden_layers
        return kw

    def window(self, src) -> int | None:
        """The one sliding window of every layer, or ``None``; refuses a config that mixes windowed and full layers."""
        if self.window_flag is not None and not getattr(src, self.window_flag, False):
            return None
        window = getattr(src, "sliding_window", None)
        src_types = getattr(src, "layer_types", None)
        if src_types is not None:
            sliding = [t == "sliding_attention" for t in src_types]
            if any(sliding) and not all(sliding):
                raise UnsupportedModelError(
                    f"{self.model_type} config mixes sliding-window and full attention layers "
                    "(use_sliding_window with max_window_layers); rad-ds supports one window for all layers"
                )
            window = window if all(sliding) else None
        return window

    def mamba_sources(self, attn) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The (weight, bias) that initialise the x, B and C rows of a new Mamba2 ``in_proj`` from attention
        module ``attn`` (MambaInLlama: x <- V, B <- K, C <- Q); ``out_proj`` takes O as it is."""
        return {name: (lin.weight, lin.bias) for name, lin in
                (("x", attn.v_proj), ("B", attn.k_proj), ("C", attn.q_proj))}

    def native_refusal(self, cfg: RadHybridConfig) -> str | None:
        """What of this family GraniteMoeHybrid cannot express in the student ``cfg``, or ``None``. The features
        every family shares (biases, window, head_dim) are checked by ``rad_ds.models.native`` itself."""
        return None


def rope_parameters(src) -> dict:
    """transformers >= 5 ``rope_parameters``, or the older ``rope_scaling`` + ``rope_theta`` fields."""
    rope = getattr(src, "rope_parameters", None)
    if rope is None:
        rope = dict(getattr(src, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = getattr(src, "rope_theta", 10000.0)
    return dict(rope)


__all__ = ["COPIED_FIELDS", "FamilyAdapter", "UnsupportedModelError", "rope_parameters"]
