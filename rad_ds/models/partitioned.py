"""Models built inside ``deepspeed.zero.Init`` and filled partition by partition: no rank holds a whole model.

Under ZeRO-3 every parameter is created already partitioned (each rank owns ``ceil(numel / world)``
elements of the flattened tensor, the last rank's share zero-padded). ``load_partition`` reads from a
safetensors checkpoint only the rows that hold this rank's share and copies them into its partition: no
communication, at most one partition-sized slice in flight. ``set_partition`` does the same from a tensor
that exists whole (a new mixer: one layer). Parameters DeepSpeed keeps elsewhere (NVMe, hpZ secondary
partitions) take the public route instead: ``GatheredParameters(modifier_rank=0)``, one tensor at a time.

``build_partitioned`` makes a RAD student (or an all-attention teacher) this way: the base's tensors for
every kept parameter, new Mamba2 mixers initialised from the base's attention of their layer (the same
values as ``surgery.replace_attention`` on a whole model: same generator, same order), and optionally the
original attention of the replaced layers (the one-copy self-distillation teacher).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.initialization import no_init_weights

from .modeling_rad_hybrid import RadAttention, RadHybridForCausalLM
from .weights import WeightSource, WeightSourceError

logger = logging.getLogger(__name__)


def zero3_enabled(ds_cfg: dict | None) -> bool:
    return bool(ds_cfg) and (ds_cfg.get("zero_optimization") or {}).get("stage") == 3


def _is_partitioned(p) -> bool:
    return hasattr(p, "ds_id")


def _direct(p) -> bool:
    """This rank's partition is an ordinary tensor we may write into."""
    return getattr(p, "ds_secondary_tensor", None) is None and getattr(p.ds_tensor, "final_location", None) is None


def _span(p) -> tuple[int, int]:
    """(first element, element count) of this rank's share of the flattened parameter."""
    size = p.ds_tensor.ds_numel
    rank = torch.distributed.get_rank(group=p.ds_process_group)
    start = size * rank
    return start, max(0, min(size, p.ds_numel - start))


@torch.no_grad()
def _gathered_set(p, full: torch.Tensor) -> None:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            p.data.copy_(full.reshape(p.ds_shape))


@torch.no_grad()
def set_partition(p, full: torch.Tensor) -> None:
    """Give parameter ``p`` the value ``full`` (its whole shape): this rank's share only when partitioned."""
    if not _is_partitioned(p):
        p.data.copy_(full.reshape(p.shape))
        return
    if not _direct(p):
        _gathered_set(p, full)
        return
    start, n = _span(p)
    p.ds_tensor[n:].zero_()
    p.ds_tensor[:n].copy_(full.reshape(-1)[start:start + n])


@torch.no_grad()
def load_partition(p, source: WeightSource, name: str) -> None:
    """Fill ``p`` from tensor ``name`` of ``source``, reading only the rows of this rank's share."""
    shape = list(p.ds_shape) if _is_partitioned(p) else list(p.shape)
    have = source.shape(name)
    if have != shape:
        raise WeightSourceError(f"{source.dir}: tensor {name} has shape {have}, the model expects {shape}")
    if not _is_partitioned(p) or not _direct(p):
        set_partition(p, source.read(name))
        return
    start, n = _span(p)
    p.ds_tensor[n:].zero_()
    if n == 0:
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    lo, hi = start // row, -(-(start + n) // row)
    off = start - lo * row
    p.ds_tensor[:n].copy_(source.rows(name, lo, hi).reshape(-1)[off:off + n])


@dataclass
class PartitionedBuild:
    model: RadHybridForCausalLM
    attention: dict[int, RadAttention] = field(default_factory=dict)  # original attention of replaced layers


def _source_name(name: str, config, source: WeightSource) -> str:
    if name not in source and name == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def _set_module(partitioned, values) -> None:
    """Every parameter of ``partitioned`` from the same-named one of the ordinary module ``values``."""
    given = dict(values.named_parameters())
    for n, q in partitioned.named_parameters():
        set_partition(q, given[n])


def _plain_attention(config, i: int, source: WeightSource, dtype) -> RadAttention:
    """Layer ``i``'s attention of the base as an ordinary module (one layer: small)."""
    attn = RadAttention(config, i).to(dtype)
    for n, q in attn.named_parameters():
        q.data.copy_(source.read(f"model.layers.{i}.self_attn.{n}"))
    return attn


def build_partitioned(config, source: WeightSource, ds_cfg: dict, dtype: torch.dtype,
                      new_mixer: Callable | None = None, new_layers=(), keep_attention: bool = False,
                      seed: int = 0) -> PartitionedBuild:
    """A RadHybridForCausalLM of ``config`` created partitioned under ``ds_cfg`` and filled from ``source``.

    ``new_layers`` (mamba2 in ``config``, attention in ``source``) get ``new_mixer(config, i, attention,
    generator=...)`` (``rad_ds.surgery.new_mixer`` with its init mode bound); with ``keep_attention`` their
    original attention is returned alongside, partitioned the same way. Collective: call on every rank."""
    import deepspeed

    new_layers = sorted(new_layers)
    # every value is loaded below: skip the random init (it cannot run on empty partitions anyway). The dtype
    # comes from the config's bf16/fp16 sections: DeepSpeed 0.19's zero.Init(dtype=...) turns any explicit
    # dtype into bfloat16 on an accelerator without fp16 (an operator-precedence slip in Init._set_dtype)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = RadHybridForCausalLM(config)
        attention = {i: RadAttention(config, i) for i in new_layers} if keep_attention else {}
    if config.tie_word_embeddings:  # skipped with the init: one parameter for the embedding and the LM head
        model.tie_weights()
    got = next(model.parameters()).dtype
    if got != dtype:
        raise ValueError(f"the DeepSpeed config's precision gives {got} parameters, model.dtype is {dtype}: set "
                         "bf16/fp16.enabled to \"auto\"")
    fresh = tuple(f"model.layers.{i}.mamba." for i in new_layers)
    for name, p in model.named_parameters():
        if not name.startswith(fresh):
            load_partition(p, source, _source_name(name, config, source))
    gen = torch.Generator().manual_seed(seed)
    for i in new_layers:
        plain = _plain_attention(config, i, source, dtype)
        _set_module(model.model.layers[i].mamba, new_mixer(config, i, plain, generator=gen).to(dtype))
        if keep_attention:
            _set_module(attention[i], plain)
    model.eval()
    return PartitionedBuild(model, attention)


__all__ = ["PartitionedBuild", "build_partitioned", "load_partition", "set_partition", "zero3_enabled"]
