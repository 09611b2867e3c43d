"""Qwen3 (dense): Llama's blocks plus an RMSNorm over ``head_dim`` on q and on k before RoPE (``q_norm``,
``k_norm``); ``head_dim`` is its own field (128 for every size, so often != hidden / heads); ``attention_bias``
(off in the released models) is on q/k/v and o alike; a sliding window only with ``use_sliding_window``.

Surgery **folds** the q/k norms into the Mamba2 init: the C rows of ``in_proj`` are ``diag(g_q) W_q`` and the B
rows ``diag(g_k) W_k`` (biases scaled the same way), with ``g`` the norm's weight repeated over the heads. Per
token and head this is Qwen3's normalised q (k) times the positive factor ``rms(W x)``: each head's direction
is kept exactly, which is what the MambaInLlama mapping keeps of attention anyway (it drops softmax and RoPE);
the per-token normalisation is what is lost, and distillation learns the magnitudes. Dropping the norms would
also lose the per-channel weights a trained model put in ``g`` (q.k then weighs channels differently); carrying
them would give Mamba2 a norm on B and C that neither mamba-ssm's kernels nor transformers' own Mamba2 layers
(the native export) have. The Mamba2 mixer therefore stays the standard one.

The native export (GraniteMoeHybrid) has no q/k norm in its attention: a Qwen3 student that keeps attention
layers is refused with one line pointing at ``--format rad_hybrid``."""

from __future__ import annotations

from ..configuration_rad_hybrid import RadHybridConfig
from .base import FamilyAdapter


class Qwen3(FamilyAdapter):
    model_type = "qwen3"
    window_flag = "use_sliding_window"
    qk_norm = True

    def mamba_sources(self, attn):
        """MambaInLlama's x <- V, B <- K, C <- Q with the k and q norm weights folded in (per channel)."""
        out = super().mamba_sources(attn)
        for name, norm, heads in (("B", attn.k_norm, attn.num_kv_heads), ("C", attn.q_norm, attn.num_heads)):
            weight, bias = out[name]
            g = norm.weight.repeat(heads)  # rows are head-major: row h * head_dim + d takes g[d]
            out[name] = (weight * g[:, None], None if bias is None else bias * g)
        return out

    def native_refusal(self, cfg: RadHybridConfig) -> str | None:
        if cfg.qk_norm and cfg.attention_layers:
            return (f"q/k RMSNorm in attention (Qwen3's q_norm/k_norm, qk_norm=True) on the attention layers "
                    f"{cfg.attention_layers}: its attention has no q/k norm")
        return None


FAMILY = Qwen3()
