"""DeepSpeed configs and the frozen teacher's engine, shared by the distillation and the teacher cache (the
process group: ``rad_ds.core.dist``; the student's training engine: ``rad_ds.distill.optim.student_engine``).

* DeepSpeed configs stay in DeepSpeed's JSON format; ``"auto"`` entries are filled from the run config
  and the world size (batch sizes, clipping, precision), explicit values are checked against them.
* ``teacher_engine``: ZeRO-3, no optimizer, eval mode, never gathered whole; optional CPU offload.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pydantic
import torch

from rad_ds.core.dtypes import to_dtype
from rad_ds.core.config import ConfigError, load_file
from rad_ds.models.sizes import layer_elements

logger = logging.getLogger(__name__)


# -- DeepSpeed configs ----------------------------------------------------------------------------


@dataclass
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world


def plan_batch(train_cfg, world: int) -> BatchPlan:
    """Derive grad_accum from global_batch (or the reverse) and check they agree with the world size."""
    mb, ga, gb = train_cfg.micro_batch, train_cfg.grad_accum, train_cfg.global_batch
    if gb is None:
        return BatchPlan(mb, ga or 1, world)
    if gb % (mb * world):
        raise ConfigError(
            f"train.global_batch={gb} is not a multiple of train.micro_batch={mb} x world size {world}; "
            f"use a global batch of {mb * world * max(1, round(gb / (mb * world)))} or change train.micro_batch"
        )
    derived = gb // (mb * world)
    if ga is not None and ga != derived:
        raise ConfigError(
            f"train.grad_accum={ga} disagrees with train.global_batch={gb} = micro_batch {mb} x world {world} "
            f"x grad_accum {derived}; set only one of train.grad_accum and train.global_batch"
        )
    return BatchPlan(mb, derived, world)


def load_ds_config(path: str | Path) -> dict:
    return load_file(path, what="DeepSpeed config", hint="; see ds_configs/")


def _fill(cfg: dict, key: str, value, source: str, what: str):
    """Fill ``"auto"`` (or a missing key) with ``value``; an explicit different value is an error."""
    have = cfg.get(key, "auto")
    if have == "auto" or have is None:
        cfg[key] = value
    elif have != value:
        raise ConfigError(
            f"DeepSpeed config {source}: {key}={have} but {what} gives {value}; set it to \"auto\" or change the "
            "run config"
        )


def zero_sizes(config) -> dict:
    """ZeRO-3 ``"auto"`` sizes (in elements) from a model config: transformers' rules for the buckets and the
    persistence threshold (hidden^2, 0.9 hidden^2, 10 hidden), and at most about two decoder layers gathered
    or kept for reuse at once (DeepSpeed's own default of 1e9 elements keeps a model of up to 1e9 parameters
    gathered whole between its uses: a one-copy step uses each layer twice)."""
    h = int(config.hidden_size)
    two_layers = 2 * layer_elements(config)
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": two_layers,
            "stage3_max_reuse_distance": two_layers}


def fill_ds_config(raw: dict, plan: BatchPlan, dtype: str, source: str, grad_clip: float | None = None,
                   offload_params: bool = False, optimizer: bool = True, model_config=None) -> dict:
    """A DeepSpeed config with every ``"auto"`` filled in and checked (a copy; ``raw`` is not changed).
    ``model_config``: the model the engine holds, for the ZeRO sizes (``zero_sizes``); without it an
    ``"auto"`` size is left to DeepSpeed's default."""
    cfg = copy.deepcopy(raw)
    _fill(cfg, "train_micro_batch_size_per_gpu", plan.micro_batch, source, "train.micro_batch")
    _fill(cfg, "gradient_accumulation_steps", plan.grad_accum, source, "train.grad_accum")
    _fill(cfg, "train_batch_size", plan.global_batch, source,
          f"micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum} x world {plan.world}")
    if grad_clip is not None:
        _fill(cfg, "gradient_clipping", float(grad_clip), source, "optim.grad_clip")
    else:
        cfg.pop("gradient_clipping", None)
    for key, on in (("bf16", to_dtype(dtype) == torch.bfloat16), ("fp16", to_dtype(dtype) == torch.float16)):
        sec = cfg.setdefault(key, {"enabled": "auto"})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = on
        elif bool(sec["enabled"]) != on:
            raise ConfigError(f"DeepSpeed config {source}: {key}.enabled={sec['enabled']} but model.dtype={dtype}; "
                              "set it to \"auto\"")
    zero = cfg.setdefault("zero_optimization", {"stage": 3})
    sizes = zero_sizes(model_config) if model_config is not None else {}
    for k in [k for k, v in zero.items() if v == "auto"]:
        if k in sizes:
            zero[k] = sizes[k]
        else:
            del zero[k]  # DeepSpeed's own default
    for k in ("offload_param", "offload_optimizer"):
        if isinstance(zero.get(k), dict) and zero[k].get("pin_memory") == "auto":
            zero[k]["pin_memory"] = torch.cuda.is_available()  # pinned memory needs a GPU
    if offload_params:
        if zero.get("stage") != 3:
            raise ConfigError(f"DeepSpeed config {source}: teacher.offload needs zero_optimization.stage 3")
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    if not optimizer:
        for k in ("optimizer", "scheduler"):
            cfg.pop(k, None)
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    validate_ds_sections(cfg, source)
    return cfg


# sections of a DeepSpeed config that DeepSpeed checks with pydantic models, checked here before any engine
_DS_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
}


def validate_ds_sections(cfg: dict, source: str) -> None:
    """DeepSpeed's own validation of each section, its error turned into one line naming the file and field
    (DeepSpeed raises a pydantic error that names neither)."""
    for section, (module, name) in _DS_SECTIONS.items():
        if not isinstance(cfg.get(section), dict):
            continue
        try:
            model = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # another DeepSpeed version: DeepSpeed checks it itself
            continue
        try:
            model(**cfg[section])
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in (section, *err.get("loc", ())))
            raise ConfigError(f"DeepSpeed config {source}: {field} = {err.get('input')!r}: {err.get('msg')}; fix "
                              "that field (see ds_configs/ for working configs)") from None


# -- engines --------------------------------------------------------------------------------------


def teacher_engine(model, ds_cfg: dict):
    """ZeRO-3 inference engine: parameters partitioned over ranks, gathered layer by layer in forward."""
    import deepspeed

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    engine.eval()
    return engine


def replicated_teacher(model, device):
    """A whole frozen teacher on this rank's device: its forward needs no communication."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


__all__ = ["BatchPlan", "fill_ds_config", "load_ds_config", "plan_batch", "replicated_teacher", "teacher_engine",
           "zero_sizes"]
