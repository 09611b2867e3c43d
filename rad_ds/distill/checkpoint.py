"""Sharded, resumable checkpoints of a distillation run.

Layout of ``OUT/checkpoints/``::

    latest                   the tag of the newest complete checkpoint (replaced atomically, last)
    step_00000100/           DeepSpeed's sharded save_checkpoint (every rank writes its own shards)
        rad_ds_state.json    step, tokens seen, sampler position, run config, replaced layers, provenance
        rad_ds_rng.pt        the RNG states of every rank
        hf/                  the student's config and tokenizer (what export needs besides the weights)
        COMPLETE             written once every rank has finished writing its shards
    zero_to_fp32.py          DeepSpeed's consolidation script

A checkpoint counts only when ``COMPLETE`` exists; ``latest`` moves after that, so a kill at any moment
leaves ``latest`` on a complete checkpoint. ``COMPLETE`` records every file's size and CRC-32 (zlib, ~4 GB/s;
the ranks checksum their share of the files in parallel), so a checkpoint proves itself: ``--resume auto``
verifies the newest one before loading it and, when a file is missing, truncated or changed, says so in one
line and falls back to the newest checkpoint that verifies. Weights that are not finite are never saved. The
last ``keep`` complete checkpoints are kept; leftovers of interrupted saves are removed at the next save.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rad_ds.core.dist import broadcast_object
from rad_ds.core.io import write_text_atomic

from rad_ds.engine.faults import fault_point

logger = logging.getLogger(__name__)

STATE_FILE = "rad_ds_state.json"
RNG_FILE = "rad_ds_rng.pt"
COMPLETE = "COMPLETE"
LATEST = "latest"
HF_DIR = "hf"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked; the message says why and what to do."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; raised before anything non-finite is saved."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not every filesystem allows it
        pass


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    tags = [d for d in root.iterdir() if d.is_dir() and _TAG.match(d.name) and is_complete(d)]
    return sorted(tags, key=lambda d: int(_TAG.match(d.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, if it is complete."""
    f = root / LATEST
    if not f.is_file():
        return None
    tag_dir = root / f.read_text().strip()
    return tag_dir if is_complete(tag_dir) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (``step_*``) from a run's ``checkpoints/`` dir, a run dir, or a tag dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: does not exist")
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            found = latest_checkpoint(root)
            if found is None:
                raise CheckpointError(f"checkpoint {root}: 'latest' names an incomplete checkpoint; give a step_* dir")
            return found
    if (p / STATE_FILE).is_file() or _TAG.match(p.name):
        if not is_complete(p):
            raise CheckpointError(
                f"checkpoint {p}: incomplete (a save was interrupted: no {COMPLETE} file); use an earlier step_* "
                "directory, or the run directory's latest"
            )
        return p
    raise CheckpointError(
        f"checkpoint {p}: not a rad-ds checkpoint (no {LATEST} file, no {STATE_FILE}); give OUT/checkpoints or a "
        "step_* directory inside it"
    )


def read_state(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {tag_dir}: unreadable {STATE_FILE} ({e})") from None


# -- integrity ---------------------------------------------------------------------------------------


def file_record(path: Path, chunk: int = 1 << 24) -> dict:
    """``{"size", "crc32"}`` of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": f"{crc:08x}"}


def verify_checkpoint(tag_dir: Path) -> str | None:
    """``None`` when every file ``COMPLETE`` lists is there with its size and CRC-32; else what is wrong, in
    words. A ``COMPLETE`` of an older version (names without sizes) is checked for the files' presence."""
    try:
        listed = json.loads((tag_dir / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE} is unreadable ({e})"
    records = listed if isinstance(listed, dict) else {name: None for name in listed}
    for name, want in sorted(records.items()):
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if want is None:
            continue
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if file_record(f)["crc32"] != want["crc32"]:
            return f"{name} has changed since it was written (CRC-32 differs)"
    return None


def _records(tag_dir: Path, rank: int, world: int) -> dict:
    """Size and CRC-32 of every file of ``tag_dir`` (collective: each rank checksums every world-th file)."""
    files = sorted(str(f.relative_to(tag_dir)) for f in tag_dir.rglob("*") if f.is_file()) if rank == 0 else None
    files = broadcast_object(files)
    mine = {name: file_record(tag_dir / name) for name in files[rank::world]}
    if torch.distributed.is_initialized() and world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return dict(sorted(mine.items()))


def newest_verified(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` whose files verify, and one line per newer one that did
    not (what is wrong with it)."""
    rejected = []
    for tag_dir in reversed(complete_tags(root)):
        problem = verify_checkpoint(tag_dir)
        if problem is None:
            return tag_dir, rejected
        rejected.append(f"checkpoint {tag_dir} does not verify: {problem}")
    return None, rejected


# -- RNG -------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save --------------------------------------------------------------------------------------------


def local_params_finite(engine) -> bool:
    """Are this rank's (partitions of the) trainable parameters finite?"""
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        t = getattr(p, "ds_tensor", p)
        if t.numel() and not torch.isfinite(t).all():
            return False
    return True


def _all_true(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.is_initialized():
        if torch.cuda.is_available():
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0.5)


@dataclass
class SavedCheckpoint:
    path: Path
    step: int


def save_checkpoint(engine, root: Path, step: int, state: dict, hf_files=None, keep: int = 2,
                    rank: int = 0, world: int = 1, exclude_frozen: bool = False) -> SavedCheckpoint:
    """Save on every rank (collective). ``state`` is the JSON client state (rank 0's is written);
    ``hf_files(dir)`` writes the student config/tokenizer into ``hf/``. ``exclude_frozen``: leave out the
    frozen parameters (a resume and the export read them from the base model's files instead)."""
    root = Path(root)
    if not _all_true(local_params_finite(engine)):
        last = latest_checkpoint(root)
        where = (f"--resume auto continues from {last} (step {int(_TAG.match(last.name).group(1))})" if last
                 else "no checkpoint was saved yet, so a restart begins at step 0")
        raise NonFiniteError(f"step {step}: the student's weights are not finite; not saved; {where}")
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a leftover of an interrupted save of the same step
            shutil.rmtree(tag_dir)
    gathered = [None] * world
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_gather_object(gathered, rng_state())
    else:
        gathered = [rng_state()]
    engine.save_checkpoint(str(root), tag=tag, client_state={"rad_ds_step": step}, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    ok = True
    fault_point("save_after_shards", step=step, rank=rank)
    if rank == 0:
        try:
            torch.save(gathered, tag_dir / RNG_FILE)
            if hf_files is not None:
                hf_files(tag_dir / HF_DIR)
            write_text_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=2, default=str) + "\n")
        except Exception:  # noqa: BLE001
            logger.exception("writing the checkpoint metadata failed")
            ok = False
    if not _all_true(ok):  # every rank has finished writing (and all succeeded) past this point
        raise RuntimeError(f"saving checkpoint {tag_dir} failed on some rank; latest still names the previous one")
    files = _records(tag_dir, rank, world)
    if rank == 0:
        write_text_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "world": world, "files": files}) + "\n")
        _fsync_dir(tag_dir)
        fault_point("save_before_latest", step=step, rank=rank)
        write_text_atomic(root / LATEST, tag)
        _fsync_dir(root)
        _prune(root, keep, current=tag_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return SavedCheckpoint(tag_dir, step)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and interrupted saves."""
    complete = complete_tags(root)
    for d in complete[:-keep]:
        if d != current:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():
        if d.is_dir() and _TAG.match(d.name) and not is_complete(d) and d != current:
            shutil.rmtree(d, ignore_errors=True)


# -- load --------------------------------------------------------------------------------------------


def load_engine_state(engine, tag_dir: Path, universal: bool = False, strict: bool = True) -> None:
    """Load DeepSpeed's shards (weights, optimizer, scheduler) of ``tag_dir`` into ``engine`` (collective);
    ``strict=False`` for a checkpoint without its frozen parameters (the engine has them from the base)."""
    inner = getattr(engine.optimizer, "optimizer", None)
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in inner.param_groups] if inner is not None else None
    try:
        path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=strict)
    except (OSError, EOFError, RuntimeError) as e:  # a shard that is unreadable although it verified (or unlisted)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {tag_dir}: cannot be loaded ({type(e).__name__}: {first}); resume from "
                              "an earlier step_* directory with --resume PATH") from None
    if path is None:
        raise CheckpointError(f"checkpoint {tag_dir}: DeepSpeed found nothing to load")
    if universal and inner is not None:
        # DeepSpeed 0.19's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        # gives every sub-group the *same* `step` tensor, which torch's Adam increments in place once per
        # group, and copies group 0's hyperparameters (weight decay) onto every group. Undo both.
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        for g, saved in zip(inner.param_groups, groups):
            g.update(saved)


def to_universal(tag_dir: Path, work_dir: Path, rank: int = 0) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0; collective barrier), so it loads
    on a different number of ranks. Returns the converted tag directory under ``work_dir``."""
    target = Path(work_dir) / tag_dir.name
    err = None
    if rank == 0:
        try:
            from deepspeed.checkpoint import ds_to_universal

            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(tag_dir), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
                keep_temp_folder=False, strict=True, inject_missing_state=False,
            ))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            err = e
    if not _all_true(err is None):
        raise CheckpointError(f"checkpoint {tag_dir}: conversion for a new world size failed ({err})") from err
    return target


def restore_rng(tag_dir: Path, rank: int, world: int) -> bool:
    """Restore this rank's RNG states; ``False`` (with a warning) when the world size changed."""
    states = torch.load(tag_dir / RNG_FILE, weights_only=False)
    if len(states) != world:
        if rank == 0:
            logger.warning(
                "checkpoint saved by %d ranks, resuming on %d: RNG states are not restored per rank (reseeded); "
                "the data order is unaffected", len(states), world,
            )
        return False
    set_rng_state(states[rank])
    return True


__all__ = [
    "CheckpointError", "NonFiniteError", "SavedCheckpoint", "complete_tags", "file_record", "is_complete",
    "latest_checkpoint", "load_engine_state", "newest_verified", "read_state", "resolve_checkpoint", "restore_rng",
    "save_checkpoint", "tag_for", "to_universal", "verify_checkpoint",
]
