"""Where the teacher lives, decided and checked from configs alone, before any weights load.

* ``shared``: self-distillation with one copy of the frozen weights: the teacher is the student's own
  stack with the original attention at the replaced layers (``one_copy.SelfDistillModel``). Per rank it
  adds only the replaced layers' attention; the layers below the first replaced one run once.
* ``replicated``: a whole frozen teacher on every rank, no communication in its forward. Per rank:
  teacher bytes. For a teacher that fits a device with room to spare (an 8B teacher on 80 GB GPUs).
* ``zero3``: a ZeRO-3 inference engine: per rank teacher bytes / world (plus a layer gathered in flight),
  each micro-batch all-gathers the whole teacher over the interconnect; with ``teacher.offload`` its
  partitions live in host memory (per node: teacher bytes x ranks on the node / world). For a teacher that
  does not fit one device (70B).

``auto``: shared for self-distillation, else replicated when the teacher takes at most
``teacher.replicate_fraction`` of a device, else zero3 (offloaded when ``teacher.offload``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rad_ds.core.dtypes import to_dtype

from rad_ds.models.sizes import layer_elements, param_count  # noqa: F401 - param_count: part of this API

from .config import ConfigError

GIB = 1 << 30
HEADROOM = 0.9  # the most of a device a location may plan for weights alone


def device_memory(cfg_gb: float | None, local_world: int) -> tuple[int, str]:
    """(bytes per rank, what they are) for the location check."""
    if cfg_gb is not None:
        return int(cfg_gb * GIB), "teacher.device_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "the GPU"
    return host_memory() // max(local_world, 1), f"host RAM / {local_world} local rank(s)"


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class TeacherLocation:
    kind: str
    teacher_bytes: int
    per_rank_bytes: int  # the teacher's weights a rank holds (device, or host when offloaded)


def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def resolve_location(cfg, self_distill: bool, teacher_config, t_ds: dict, world: int,
                     local_world: int) -> TeacherLocation:
    """Where the teacher runs in this run, or a one-line ConfigError saying what does not fit and what would."""
    t = cfg.teacher
    nbytes = param_count(teacher_config) * torch.empty((), dtype=to_dtype(cfg.model.dtype)).element_size()
    device, what = device_memory(t.device_memory_gb, local_world)
    kind = t.location
    if kind == "shared" and not self_distill:
        raise ConfigError(f"teacher.location=shared needs self-distillation (the teacher is the base itself); the "
                          f"teacher here is {t.path}: use teacher.location=replicated or zero3")
    if kind == "auto":
        if self_distill and not t.offload:
            kind = "shared"
        elif not t.offload and nbytes <= t.replicate_fraction * device:
            kind = "replicated"
        else:
            kind = "zero3"
    if kind == "shared":
        return TeacherLocation(kind, nbytes, 0)
    if kind == "replicated":
        if nbytes > HEADROOM * device:
            raise ConfigError(
                f"teacher.location=replicated: the teacher's weights take {_gb(nbytes)} per rank, {what} has "
                f"{_gb(device)}: use teacher.location=zero3 ({_gb(nbytes // world)} per rank on {world} ranks)")
        return TeacherLocation(kind, nbytes, nbytes)
    stage = (t_ds.get("zero_optimization") or {}).get("stage")
    if stage != 3:
        raise ConfigError(f"teacher.deepspeed {t.deepspeed} has zero_optimization.stage {stage}: teacher.location="
                          "zero3 needs stage 3 (ds_configs/zero3_teacher.json), or use teacher.location=replicated")
    share = -(-nbytes // world)
    if t.offload:
        node, node_need = host_memory(), share * local_world
        if node_need > HEADROOM * node:
            raise ConfigError(f"teacher.offload: the teacher's partitions take {_gb(node_need)} of host memory per "
                              f"node ({local_world} ranks), the host has {_gb(node)}: use more nodes")
    elif share > HEADROOM * device:
        raise ConfigError(
            f"teacher.location=zero3: the teacher's partition takes {_gb(share)} per rank on {world} ranks, {what} "
            f"has {_gb(device)}: add teacher.offload=true (host memory) or more ranks")
    return TeacherLocation(kind, nbytes, share)


__all__ = ["TeacherLocation", "device_memory", "host_memory", "layer_elements", "param_count", "resolve_location"]
