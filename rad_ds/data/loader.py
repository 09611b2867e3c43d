"""The one loader that feeds both engines: packed rows, cached per run, served as per-step micro-batches.

The packed rows are built once per filesystem into ``OUT/data/<key>/packed.npz`` (the key hashes the
files, the tokenizer and the data settings) with :func:`rad_ds.core.shared_cache.build_once`: whichever
process takes the file lock first builds, every other rank or node waits on the lock (not in a
collective, so no collective timeout applies) and then reads the finished file, so every rank holds
the same rows. Nodes that share no filesystem each build an identical copy (same bytes). Each step
every rank knows the whole global batch, so the token counts that normalise the losses of the step
are computed locally, without a collective.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rad_ds.core.batching import pad_id
from rad_ds.core.io import write_json_atomic
from rad_ds.core.shared_cache import build_once

from .packing import Packed, pack_documents
from .sampler import ResumableSampler
from .sources import DataError, load_records, resolve_files
from .tokenization import tokenize_documents, tokenizer_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (b, l) long
    target: torch.Tensor  # (b, l) bool: the prediction at this position counts (logit losses)
    token: torch.Tensor  # (b, l) bool: a real token (hidden-state losses)
    position_ids: torch.Tensor  # (b, l) long: 0 at each document start (transformers' packed convention)
    rows: np.ndarray | None = None  # the packed rows these are (None for rows made during training)


@dataclass
class StepBatch:
    micro: list[MicroBatch]  # this rank's micro-batches
    n_target: int  # counted positions in the whole global batch
    n_token: int  # real tokens in the whole global batch
    rows: np.ndarray  # the global batch's row indices


CACHE_VERSION = 2  # 2: position_ids, long_documents; bump when the packed arrays change
BUILD_TIMEOUT_S = 7 * 24 * 3600.0  # a rank waits this long for another process building the data
_NPZ = "packed.npz"


def data_cache_key(data_cfg, tok) -> str:
    builder, files = resolve_files(data_cfg.path, data_cfg.format)
    stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    settings = {k: getattr(data_cfg, k) for k in (
        "path", "format", "split", "text_field", "messages_field", "seq_len", "packing", "mask_prompt", "add_eos",
        "max_documents", "min_tokens", "long_documents")}
    blob = json.dumps({"files": stat, "builder": builder, "settings": settings, "tok": tokenizer_fingerprint(tok),
                       "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_packed(data_cfg, tok) -> Packed:
    """Load, tokenise (``data.num_proc`` processes, datasets' cache) and pack ``data_cfg``'s records;
    logs one line of counts (documents read, dropped and why, split or truncated, rows)."""
    records = load_records(data_cfg.path, data_cfg.format, data_cfg.split, data_cfg.text_field,
                           data_cfg.messages_field, data_cfg.max_documents)
    docs = tokenize_documents(records, tok, add_eos=data_cfg.add_eos, mask_prompt=data_cfg.mask_prompt,
                              min_tokens=data_cfg.min_tokens, num_proc=data_cfg.num_proc)
    packed = pack_documents(docs, data_cfg.seq_len, data_cfg.packing, pad_id(tok), data_cfg.long_documents)
    st = docs.stats
    logger.info(
        "data %s: %d records -> %d documents (dropped %d: %d empty, %d shorter than data.min_tokens=%d, %d with "
        "nothing to learn); %d longer than data.seq_len=%d (%d split, %d truncated; %d pieces left without a "
        "counted position dropped); %d rows, %.1f%% of positions real tokens%s",
        data_cfg.path, st["read"], len(docs), st["read"] - len(docs), st["empty"], st["too_short"],
        data_cfg.min_tokens, st["no_target"], packed.n_split + packed.n_truncated, data_cfg.seq_len,
        packed.n_split, packed.n_truncated, packed.n_pieces_dropped, len(packed),
        100.0 * float(packed.token.mean()) if len(packed) else 0.0,
        f"; {st['slow_masks']} conversations masked by per-prefix renders" if st.get("slow_masks") else "",
    )
    if not len(packed):
        raise DataError(
            f"data.path {data_cfg.path}: no usable documents after packing (with data.long_documents=truncate no "
            f"counted position lies in the first data.seq_len={data_cfg.seq_len} tokens); raise data.seq_len or "
            "use data.long_documents=split"
        )
    return packed


def save_packed(packed: Packed, path: str | os.PathLike) -> None:
    """``packed`` as an ``.npz`` with fixed zip timestamps: the same rows give the same bytes on every node."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in packed.arrays().items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def read_packed(path: str | os.PathLike) -> Packed:
    with np.load(path) as a:
        return Packed.from_arrays(a)


def _error_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f".{key}.error.json"


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def load_packed(data_cfg, tok, cache_dir: Path | None) -> Packed:
    """The packed rows, built once and cached under ``cache_dir`` (``None``: no cache, every caller builds).

    Every rank calls this; the first to take the cache's file lock builds, the others wait on the lock
    and read the result. A build that fails leaves its error beside the cache, so the ranks that waited
    on it raise the same error instead of each building again. No collective is needed (or risked under
    its timeout) while one builds."""
    if cache_dir is None:
        return build_packed(data_cfg, tok)
    cache_dir = Path(cache_dir)
    key = data_cache_key(data_cfg, tok)
    path, err = cache_dir / key, _error_file(cache_dir, key)
    seen = _mtime(err)  # an error left before this call is not the build this call waits for

    def build(tmp: Path) -> None:
        if _mtime(err) not in (None, seen):  # the build this process waited for failed
            e = json.loads(err.read_text())
            raise (DataError if e["type"] == "DataError" else RuntimeError)(e["message"])
        try:
            save_packed(build_packed(data_cfg, tok), tmp / _NPZ)
        except Exception as e:
            msg = str(e) if isinstance(e, DataError) else f"preparing the data failed: {type(e).__name__}: {e}"
            write_json_atomic(err, {"type": "DataError" if isinstance(e, DataError) else "RuntimeError",
                                    "message": msg, "pid": os.getpid()}, fsync=False)
            raise
        err.unlink(missing_ok=True)

    build_once(path, build, key={"data": key, "version": CACHE_VERSION}, timeout_s=BUILD_TIMEOUT_S,
               what="packed data")
    return read_packed(path / _NPZ)


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
            position_ids=torch.from_numpy(p.position_ids[rows].astype(np.int64)),
            rows=np.asarray(rows),
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


__all__ = ["DistillLoader", "MicroBatch", "StepBatch", "build_packed", "data_fingerprint", "load_packed", "read_packed",
           "save_packed"]
