"""Dtype names: one table for every stage, in both vocabularies users write (``bf16`` and ``bfloat16``)."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
NAMES = tuple(DTYPES)
NAMES_32_16 = tuple(n for n in NAMES if DTYPES[n] != torch.float64)  # what training and evaluation run in


def to_dtype(name: str | None, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of ``name``; ``None``: bf16 on CUDA, fp32 elsewhere."""
    if name is None:
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a loss over ``x`` computes in: float32 for half-precision inputs, float64 for float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


__all__ = ["DTYPES", "NAMES", "NAMES_32_16", "compute_dtype", "dtype_name", "to_dtype"]
