"""What trains, the optimizer and the learning-rate schedule of the student.

By default only the new Mamba2 mixers train (RAD trains only the added SSM components); ``trainable``
opens the MLPs of the replaced layers, whole replaced layers, or everything for a second stage.
"""

from __future__ import annotations

import copy
import math

import torch

from rad_ds.distill.config import TRAINABLE


def trainable_prefixes(trainable: str, replaced_layers: list[int]) -> list[str] | None:
    """Parameter-name prefixes that train (``None``: every parameter)."""
    if trainable == "all":
        return None
    parts = {"mamba": ("mamba.",), "mamba_mlp": ("mamba.", "mlp."), "replaced": ("",)}
    if trainable not in parts:
        raise ValueError(f"student.trainable={trainable!r}: use one of {', '.join(TRAINABLE)}")
    return [f"model.layers.{i}.{p}" for i in replaced_layers for p in parts[trainable]]


def set_trainable(model: torch.nn.Module, trainable: str, replaced_layers: list[int]) -> list[str]:
    """Set ``requires_grad`` on the student; returns the names of the trainable parameters."""
    prefixes = trainable_prefixes(trainable, replaced_layers)
    names = []
    for name, p in model.named_parameters():
        on = prefixes is None or any(name.startswith(pre) for pre in prefixes)
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ValueError(
            f"student.trainable={trainable!r} selects no parameters (replaced layers: {replaced_layers}); "
            "replace some layers (--layers) or choose student.trainable=all"
        )
    return names


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; vectors (biases, norms) and Mamba2's dt_bias / A_log / D do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # a ZeRO-3 partition is stored flat
        (no_decay if ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """torch AdamW (no C++ build, exact on CPU and GPU). ZeRO wraps it and feeds it the flat fp32 shards."""
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, foreach=False,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup from
    ``1/warmup`` to 1 over ``warmup_steps`` steps, then cosine / linear decay to ``min_lr_ratio`` at the
    last step, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule={schedule!r}: use cosine, linear or constant")


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, optim_cfg.warmup_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio),
    )


# -- the training engine --------------------------------------------------------------------------


def _fill_optimizer_block(cfg: dict, optim_cfg, total_steps: int) -> None:
    """A user's own ``optimizer`` / ``scheduler`` blocks: fill their ``"auto"`` params from the run config."""
    if "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        auto = {"lr": optim_cfg.lr, "betas": list(optim_cfg.betas), "eps": optim_cfg.eps,
                "weight_decay": optim_cfg.weight_decay}
        for k, v in auto.items():
            if params.get(k) == "auto":
                params[k] = v
        if not torch.cuda.is_available() and cfg["optimizer"].get("type", "").lower() in ("adam", "adamw"):
            params.setdefault("torch_adam", True)  # FusedAdam needs a CUDA build
    if "scheduler" in cfg:
        params = cfg["scheduler"].setdefault("params", {})
        for k, v in {"total_num_steps": total_steps, "warmup_num_steps": optim_cfg.warmup_steps,
                     "warmup_max_lr": optim_cfg.lr}.items():
            if params.get(k) == "auto":
                params[k] = v


def student_engine(model, ds_cfg: dict, optim_cfg, total_steps: int):
    """The training engine; the optimizer sees only ``requires_grad`` parameters."""
    import deepspeed

    cfg = copy.deepcopy(ds_cfg)
    _fill_optimizer_block(cfg, optim_cfg, total_steps)
    optimizer = scheduler = None
    if "optimizer" not in cfg:
        optimizer = build_optimizer(model, optim_cfg)
        if "scheduler" not in cfg:
            scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params if optimizer is None else None, optimizer=optimizer,
        lr_scheduler=scheduler, config=cfg,
    )
    engine.train()
    return engine


__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups", "set_trainable", "student_engine",
           "trainable_prefixes"]
