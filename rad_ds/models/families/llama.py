"""Llama (Llama 2, Llama 3.x with its RoPE scaling, SmolLM / SmolLM2, TinyLlama): the reference mapping.

``attention_bias`` puts a bias on q/k/v and o alike; no sliding window; no q/k norm. SmolLM2 (the embedded
default, ``embedded:smollm2``) is ``model_type="llama"``."""

from __future__ import annotations

from .base import FamilyAdapter


class Llama(FamilyAdapter):
    model_type = "llama"


FAMILY = Llama()
