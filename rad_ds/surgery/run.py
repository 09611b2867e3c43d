"""The replace stage: load a base model, replace the chosen layers, write the student directory."""

from __future__ import annotations

from pathlib import Path

import torch

from rad_ds.core.dtypes import dtype_name, to_dtype
from rad_ds.core.sections import ModelRef
from rad_ds.models.conversion import load_model, save_model

from .config import ReplaceConfig
from .replace import (
    ReplacementRecord,
    check_layers,
    layers_from_report,
    replace_attention,
)


def replace(cfg: ReplaceConfig, dtype: torch.dtype | None = None) -> ReplacementRecord:
    """Write the student checkpoint of ``cfg`` to ``cfg.out`` (safetensors, config with ``replaced_layers``,
    tokenizer, model code, ``replacement.json``) in ``dtype`` (default: ``cfg.model.dtype``). Every check runs
    before anything is written; the directory appears complete or not at all."""
    cfg.validate()
    dtype = dtype if dtype is not None else to_dtype(cfg.model.dtype)
    model, tok = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file, dtype=dtype)
    layers, selection = cfg.layers, {}
    if cfg.report is not None:
        layers, selection = layers_from_report(cfg.report, int(cfg.k), model.config)
    check_layers(model.config, layers, allow_all=cfg.allow_all)
    record = replace_attention(model, layers, init=cfg.init, allow_all=cfg.allow_all, seed=cfg.seed,
                               selection=selection)
    record.source = cfg.model.source
    model.config.replaced_layers = record.to_dict()
    save_model(model, tok, Path(cfg.out), extra_files={"replacement.json": record.to_dict()})
    return record


def build_student(model_path: str, out_dir, layers=None, report=None, k=None, gguf_file=None, init="attention",
                  allow_all=False, seed=0, overwrite=False, dtype: torch.dtype = torch.float32) -> ReplacementRecord:
    """``replace`` with its settings as arguments (the library call of earlier releases)."""
    cfg = ReplaceConfig(model=ModelRef(model_path, gguf_file, dtype_name(dtype)), layers=layers,
                        report=None if report is None else str(report), k=k, out=str(out_dir), init=init,
                        allow_all=allow_all, seed=seed, overwrite=overwrite)
    return replace(cfg, dtype)


__all__ = ["build_student", "replace"]
