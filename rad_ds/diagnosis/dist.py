"""Process-group plumbing for diagnosis: prompts are sharded over ranks, statistics reduced."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_from_env(timeout_s: int = 900) -> tuple[int, int]:
    """Join the process group set up by ``deepspeed`` / ``torchrun`` (env vars); (0, 1) when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores: without this each takes them all and they thrash
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device():
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    x = t.to(_device())
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
