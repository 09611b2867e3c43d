"""Mistral: Llama's blocks with one sliding window (``sliding_window``) on every attention layer."""

from __future__ import annotations

from .base import FamilyAdapter


class Mistral(FamilyAdapter):
    model_type = "mistral"


FAMILY = Mistral()
