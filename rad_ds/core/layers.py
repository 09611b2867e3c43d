"""Layer lists as users write them (``3,7``, ``4-6``, ``[3, 7]``), as rad-ds prints them (``AAMA``), and the
attention layers of a config."""

from __future__ import annotations


def parse_int_list(text, what: str = "--layers", error: type[Exception] = ValueError,
                   noun: str = "an integer") -> list[int]:
    """'3,7,11' -> [3, 7, 11]; ranges like '4-6' are accepted; an int or a list passes through."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [text]
    if isinstance(text, (list, tuple)):
        text = ",".join(str(x) for x in text)
    out: list[int] = []
    for part in str(text).strip().strip("[]").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise error(f"{what}: {part!r} is not {noun}; give e.g. 3,7,11 or 4-6") from None
    if not out:
        raise error(f"{what} is empty; give e.g. 3,7,11")
    return out


def attention_layers(config) -> list[int]:
    """Indices of the attention layers of a hybrid config (``layer_types``): what a placement may replace and a
    draft may skip."""
    return [i for i, t in enumerate(config.layer_types) if t == "attention"]


def layers_string(config) -> str:
    """The per-layer layout of a hybrid config: ``A`` for attention, ``M`` for Mamba2."""
    return "".join("A" if t == "attention" else "M" for t in config.layer_types)


__all__ = ["attention_layers", "layers_string", "parse_int_list"]
