"""Qwen2 / Qwen2.5: biases on q, k and v (never on o), which the surgery maps onto the x, B and C rows of
Mamba2's ``in_proj``; a sliding window only with ``use_sliding_window`` (and then on every layer)."""

from __future__ import annotations

from .base import FamilyAdapter


class Qwen2(FamilyAdapter):
    model_type = "qwen2"
    qkv_bias = True
    out_bias = False
    window_flag = "use_sliding_window"


FAMILY = Qwen2()
