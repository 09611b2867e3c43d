"""Config of the RAD hybrid: Llama-style decoder blocks whose mixer is attention or Mamba2, per layer.

``layer_types[i]`` is ``"attention"`` or ``"mamba2"``. With every layer ``"attention"`` the model is
exactly a Llama / Qwen2 / Qwen3 / Mistral / SmolLM model; a RAD student switches some layers to ``"mamba2"``.
``replaced_layers`` records which layers surgery converted, and how they were initialised.
In ``config.json`` the same list is written with transformers' names (``"full_attention"``,
``"linear_attention"``) so that generic transformers tools accept the file; it reads back as
``"attention"`` / ``"mamba2"``.

This file is copied next to exported checkpoints (``trust_remote_code``), so it imports only
transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

LAYER_TYPES = ("attention", "mamba2")
# transformers >= 5 rewrites a few legacy layer-type names in every config (e.g. "attention" ->
# "full_attention"); we read both spellings and keep ours.
_ALIASES = {"full_attention": "attention", "mamba": "mamba2", "linear_attention": "mamba2"}


_ON_DISK = {"attention": "full_attention", "mamba2": "linear_attention"}


def canonical_layer_types(layer_types):
    return None if layer_types is None else [_ALIASES.get(t, t) for t in layer_types]


class RadHybridConfig(PretrainedConfig):
    model_type = "rad_hybrid"
    keys_to_ignore_at_inference = ["cache"]

    # -- Llama-family fields (same names and meaning as LlamaConfig / Qwen2Config / MistralConfig)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False  # bias on q/k/v (Llama with attention_bias, Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (Llama with attention_bias)
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style window on every attention layer
    qk_norm: bool = False  # RMSNorm over head_dim on q and on k before RoPE (Qwen3's q_norm / k_norm)
    source_model_type: str | None = None  # the HF model_type imported (rad_ds.models.families adapts it)

    # -- hybrid layout
    layer_types: list | None = None
    replaced_layers: dict | None = None  # {"layers": [...], "init": "attention", "source": ...}

    # -- Mamba2 mixer (MambaInLlama shapes; None = derived from the attention shapes)
    mamba_d_inner: int | None = None
    mamba_d_xb: int | None = None
    mamba_d_state: int | None = None
    mamba_headdim: int | None = None
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 64
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool | None = None  # None: follows attention_bias, so q/k/v biases map onto B/C/x
    mamba_out_bias: bool | None = None  # None: follows attention_out_bias
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_dt_limit: list | None = None  # [lo, hi] clamp of dt; None = no clamp
    mamba_A_init_range: list | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["attention"] * self.num_hidden_layers
        if self.mamba_d_inner is None:
            self.mamba_d_inner = self.num_attention_heads * self.head_dim
        if self.mamba_d_xb is None:
            self.mamba_d_xb = self.num_key_value_heads * self.head_dim
        if self.mamba_d_state is None:
            self.mamba_d_state = self.head_dim
        if self.mamba_headdim is None:
            self.mamba_headdim = self.head_dim
        if self.mamba_proj_bias is None:
            self.mamba_proj_bias = bool(self.attention_bias)
        if self.mamba_out_bias is None:
            self.mamba_out_bias = bool(self.attention_out_bias)
        if self.mamba_A_init_range is None:
            self.mamba_A_init_range = [1.0, 16.0]
        super().__post_init__(**kwargs)
        # undo transformers' legacy remap of "attention" -> "full_attention"
        self.layer_types = canonical_layer_types(list(self.layer_types))
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.check()

    def check(self):
        """Fail early, naming the field, on a layout or shape that the model cannot build."""
        lt = self.layer_types
        if len(lt) != self.num_hidden_layers:
            raise ValueError(
                f"RadHybridConfig.layer_types has {len(lt)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one type per layer"
            )
        bad = sorted({t for t in lt if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"RadHybridConfig.layer_types: unknown type(s) {bad}; use one of {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if "mamba2" in lt:
            if self.mamba_d_inner % self.mamba_headdim or self.mamba_d_inner % self.mamba_d_state:
                raise ValueError(
                    f"mamba_d_inner ({self.mamba_d_inner}) must be a multiple of mamba_headdim "
                    f"({self.mamba_headdim}) and mamba_d_state ({self.mamba_d_state})"
                )
            if self.mamba_d_inner % self.mamba_d_xb or self.mamba_d_xb % self.mamba_d_state:
                raise ValueError(
                    f"mamba_d_xb ({self.mamba_d_xb}) must divide mamba_d_inner ({self.mamba_d_inner}) and be a "
                    f"multiple of mamba_d_state ({self.mamba_d_state})"
                )

    def validate_layer_type(self):
        """transformers' own check only knows its layer-type names; ours are "attention" / "mamba2"."""
        self.check()

    def validate(self):
        # transformers >= 5 runs the class validators that its base config collected, including a
        # layer-type check with a fixed list of names; run them all, with ours in place of that one
        for validator in getattr(PretrainedConfig, "__class_validators__", []):
            if validator.__name__ == "validate_layer_type":
                self.check()
            else:
                validator(self)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "mamba2"]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("layer_types") is not None:
            # on disk, transformers' own names, so generic tools (AutoTokenizer, AutoConfig without
            # remote code) accept the file; they read back as "attention" / "mamba2"
            out["layer_types"] = [_ON_DISK[t] for t in canonical_layer_types(out["layer_types"])]
        return out


__all__ = ["RadHybridConfig"]
