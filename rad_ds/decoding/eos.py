"""End-of-sequence ids: the one place that turns ``eos_token_id`` values (None, an id, a list) into a set."""

from __future__ import annotations


def eos_set(*values) -> set[int]:
    """The union of ``eos_token_id``-like values: each ``None``, one id or a list/tuple of ids."""
    ids: set[int] = set()
    for e in values:
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple, set, frozenset)):
            ids.update(int(x) for x in e)
    return ids


def model_eos_ids(tokenizer, model) -> set[int]:
    """Every id that ends generation for this model: the tokenizer's, the generation config's, the config's."""
    gen = getattr(model, "generation_config", None)
    return eos_set(getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None))


__all__ = ["eos_set", "model_eos_ids"]
