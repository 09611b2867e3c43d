"""The one loader that feeds both engines: packed rows, cached per run, served as per-step micro-batches.

Rank 0 tokenises and packs once and writes ``OUT/data/<key>.npz`` (the key hashes the files, the
tokenizer and the data settings); the other ranks wait and read it, so every rank holds the same rows.
Each step every rank knows the whole global batch, so the token counts that normalise the losses of the
step are computed locally, without a collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rad_ds.core.io import atomic_path

from .packing import Packed, pack_documents
from .sampler import ResumableSampler
from .sources import load_records, resolve_files
from .tokenization import tokenize_records, tokenizer_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (b, l) long
    target: torch.Tensor  # (b, l) bool: the prediction at this position counts (logit losses)
    token: torch.Tensor  # (b, l) bool: a real token (hidden-state losses)


@dataclass
class StepBatch:
    micro: list[MicroBatch]  # this rank's micro-batches
    n_target: int  # counted positions in the whole global batch
    n_token: int  # real tokens in the whole global batch
    rows: np.ndarray  # the global batch's row indices


def data_cache_key(data_cfg, tok) -> str:
    builder, files = resolve_files(data_cfg.path, data_cfg.format)
    stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    settings = {k: getattr(data_cfg, k) for k in (
        "path", "format", "split", "text_field", "messages_field", "seq_len", "packing", "mask_prompt", "add_eos",
        "max_documents", "min_tokens")}
    blob = json.dumps({"files": stat, "builder": builder, "settings": settings, "tok": tokenizer_fingerprint(tok),
                       "version": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_packed(data_cfg, tok) -> Packed:
    records = load_records(data_cfg.path, data_cfg.format, data_cfg.split, data_cfg.text_field,
                           data_cfg.messages_field, data_cfg.max_documents)
    docs = tokenize_records(records, tok, add_eos=data_cfg.add_eos, mask_prompt=data_cfg.mask_prompt,
                            min_tokens=data_cfg.min_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return pack_documents(docs, data_cfg.seq_len, data_cfg.packing, pad)


def load_packed(data_cfg, tok, cache_dir: Path | None, rank: int = 0, barrier=None) -> Packed:
    """The packed rows, built by rank 0 and cached under ``cache_dir`` (``None``: no cache, every rank builds).

    ``barrier`` is called by every rank between rank 0's write and the others' read. A failure on rank 0
    is passed to the other ranks (as a missing file), so every rank raises instead of hanging."""
    if cache_dir is None:
        return build_packed(data_cfg, tok)
    path = Path(cache_dir) / f"{data_cache_key(data_cfg, tok)}.npz"
    err = None
    if rank == 0 and not path.is_file():
        try:
            packed = build_packed(data_cfg, tok)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **packed.arrays())
        except Exception as e:  # noqa: BLE001 - re-raised after the barrier so no rank waits forever
            err = e
    if barrier is not None:
        barrier()
    if err is not None:
        raise err
    if not path.is_file():
        raise RuntimeError(f"rank 0 could not prepare the data ({path} missing); see rank 0's error")
    with np.load(path) as a:
        return Packed.from_arrays(a)


def data_fingerprint(packed: Packed) -> str:
    h = hashlib.sha1()
    for a in (packed.input_ids, packed.target, packed.token):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class DistillLoader:
    """Per-step micro-batches for one rank; ``state_dict`` is the sampler position."""

    def __init__(self, packed: Packed, micro_batch: int, grad_accum: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.packed = packed
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.global_batch = micro_batch * grad_accum * world
        self.sampler = ResumableSampler(len(packed), self.global_batch, seed=seed, shuffle=shuffle)

    def _micro(self, rows: np.ndarray) -> MicroBatch:
        p = self.packed
        return MicroBatch(
            input_ids=torch.from_numpy(p.input_ids[rows].astype(np.int64)),
            target=torch.from_numpy(p.target[rows].astype(bool)),
            token=torch.from_numpy(p.token[rows].astype(bool)),
        )

    def next_step(self) -> StepBatch:
        rows = self.sampler.next_global_batch()
        micro = [self._micro(r) for r in ResumableSampler.shard(rows, self.rank, self.world, self.grad_accum)]
        return StepBatch(
            micro=micro,
            n_target=int(self.packed.target[rows].sum()),
            n_token=int(self.packed.token[rows].sum()),
            rows=rows,
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


__all__ = ["DistillLoader", "MicroBatch", "StepBatch", "build_packed", "data_fingerprint", "load_packed"]
