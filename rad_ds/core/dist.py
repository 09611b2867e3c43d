"""The process group of every stage, and the reductions the stages share.

``init_distributed`` is the one initialisation: under the ``deepspeed`` launcher, ``torchrun`` or plain
``python``; gloo on CPU, nccl on CUDA; a timeout on every collective (a dead rank ends the job instead of
hanging it); CPU threads split between the ranks of a node. DeepSpeed engines need a process group even
in a world of one, so ``deepspeed=True`` sets one up on a free port (and ``release_env`` puts the
variables back afterwards); diagnosis and evaluation run without one when alone.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SELF_INIT = False  # this process set RANK/WORLD_SIZE itself (no launcher)
_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SAVED_ENV: dict | None = None  # those variables as they were before, restored by release_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size(world: int) -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE), else ``world``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))


def _split_cpu_threads(world: int) -> None:
    """CPU ranks on one node share its cores: without this each takes them all and they thrash."""
    if world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world_size(world), 1)))


def init_distributed(timeout_s: int = 600, deepspeed: bool = False) -> DistInfo:
    """Join (once) the process group the launcher describes in the environment; see the module docstring."""
    global _SELF_INIT, _SAVED_ENV
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if deepspeed:
        import deepspeed as ds

        # ZeRO does not use DeepSpeed's shared-memory comm op; building it costs ~100 s on a small CPU
        ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "RANK" not in os.environ or _SELF_INIT:
            # plain `python launchers/distill.py` (or a library call): a world of one on a free port
            _SELF_INIT = True
            if _SAVED_ENV is None:
                _SAVED_ENV = {k: os.environ.get(k) for k in _ENV_KEYS}
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            if not dist.is_initialized():
                os.environ["MASTER_PORT"] = str(_free_port())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _split_cpu_threads(world)
    if torch.cuda.is_available() and (deepspeed or world > 1):
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized() and deepspeed:
        _forget_deepspeed_groups()
        os.environ.setdefault("LOCAL_RANK", "0")
        ds.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    elif not dist.is_initialized() and world > 1:
        dist.init_process_group(backend=backend, timeout=timeout)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    return DistInfo(0, 1, local_rank, backend)


def init_from_env(timeout_s: int = 900) -> tuple[int, int]:
    """(rank, world) of ``init_distributed`` without DeepSpeed: (0, 1) when alone."""
    info = init_distributed(timeout_s)
    return info.rank, info.world


def release_env() -> None:
    """Put back the variables a world of one set in ``os.environ`` (DeepSpeed reads them while engines are
    built); left behind, they would make every subprocess of this process believe it is rank 0 of a
    launched job. The process group itself stays as it is."""
    global _SAVED_ENV
    if _SAVED_ENV is None:
        return
    for k, v in _SAVED_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _SAVED_ENV = None


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after a process group was destroyed (a second
    run in one process: a notebook, the tests) they would point at the dead group."""
    from deepspeed.utils import groups

    for name, value in vars(groups).copy().items():
        cached = name.endswith(("_GROUP", "_GROUP_RANKS", "_WORLD_SIZE", "_RANK"))
        if name.startswith("_") and name.isupper() and cached:
            setattr(groups, name, {} if isinstance(value, dict) else None)


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
