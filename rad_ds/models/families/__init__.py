"""The model-family registry: HF ``model_type`` -> ``FamilyAdapter``, read by the import
(``conversion.config_from_hf``), the surgery (``mamba_sources``) and the native export (``native_refusal``).

Adding a family is one file here (a ``FamilyAdapter`` subclass and its ``FAMILY``) and one line in
``REGISTRY`` (docs/extending.md); ``register`` adds one at run time.
"""

from __future__ import annotations

from . import llama, mistral, qwen2, qwen3, rad_hybrid
from .base import COPIED_FIELDS, FamilyAdapter, UnsupportedModelError, rope_parameters

REGISTRY: dict[str, FamilyAdapter] = {
    llama.FAMILY.model_type: llama.FAMILY,
    mistral.FAMILY.model_type: mistral.FAMILY,
    qwen2.FAMILY.model_type: qwen2.FAMILY,
    qwen3.FAMILY.model_type: qwen3.FAMILY,
    rad_hybrid.FAMILY.model_type: rad_hybrid.FAMILY,
}
# a student saved before rad-ds recorded its family (no ``source_model_type``) has no q/k norm: Llama's mapping
_UNRECORDED = llama.FAMILY


def supported() -> tuple[str, ...]:
    """The model types rad-ds imports, in registry order."""
    return tuple(REGISTRY)


def register(family: FamilyAdapter) -> FamilyAdapter:
    """Add (or replace) a family at run time; returns it."""
    if not family.model_type:
        raise ValueError(f"{type(family).__name__}.model_type is empty; set it to the HF config's model_type")
    REGISTRY[family.model_type] = family
    return family


def family(model_type: str | None, architectures=None) -> FamilyAdapter:
    """The adapter of ``model_type``; an unknown one is refused in one line naming the supported ones."""
    if model_type not in REGISTRY:
        arch = f" ({', '.join(architectures)})" if architectures else ""
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}{arch}; rad-ds imports "
                                    f"{', '.join(REGISTRY)} checkpoints (add a family: docs/extending.md)")
    return REGISTRY[model_type]


def family_of(config) -> FamilyAdapter:
    """The family a RadHybridConfig was imported from (``config.source_model_type``)."""
    source = getattr(config, "source_model_type", None)
    if source is None:
        if getattr(config, "qk_norm", False):
            raise UnsupportedModelError("config has qk_norm=True but no source_model_type; set source_model_type "
                                        "to the family it was imported from (e.g. \"qwen3\")")
        return _UNRECORDED
    return family(source)


__all__ = ["COPIED_FIELDS", "REGISTRY", "FamilyAdapter", "UnsupportedModelError", "family", "family_of",
           "register", "rope_parameters", "supported"]
