"""The offline teacher cache on disk, and the one reader and writer of its files.

For every counted position of every packed row (``target`` = 1: the positions whose prediction a logit loss
uses) the cache holds the teacher's ``k`` most likely next tokens at temperature T, their log-probabilities
and the log of the probability mass outside them (the tail bucket; see ``distill.losses.teacher_topk``).
Positions that no loss reads (prompts under ``data.mask_prompt``, padding, document ends) are not stored.

A cache directory::

    manifest.json                      what the cache was made from (``fingerprint``: teacher, tokenizer,
                                       data, seq_len, k, temperature, vocab, dtypes), the shard size, the
                                       status ("writing" until every shard exists, then "complete") and totals
    shards/shard-00000.safetensors     packed rows [s * rows_per_shard, (s + 1) * rows_per_shard), written
    shards/shard-00001.safetensors     atomically by whichever rank computed them:
    ...                                  offsets (n + 1,) int64: row i's positions are offsets[i]:offsets[i+1]
                                         indices (P, k) uint16 (vocab <= 65536) or int32
                                         logp    (P, k) float16 | bfloat16 | float32 (values_dtype)
                                         tail    (P,)   float32

Shards are safetensors files, memory-mapped by the reader (a micro-batch reads only its rows' slices). A shard
either exists whole or not at all, so a killed writer resumes by computing the missing shards; a manifest
made for anything else (another teacher, tokenizer, data, seq_len, k, temperature) is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rad_ds.core.dtypes import to_dtype
from rad_ds.core.io import atomic_path, write_json_atomic
from rad_ds.core.logs import LOG_FILE

VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
VALUE_DTYPES = ("float16", "bfloat16", "float32")  # names of rad_ds.core.dtypes
# what a mismatch means to the user, in the order the checks report them
FINGERPRINT_NAMES = {
    "teacher_config": "teacher architecture", "teacher_weights": "teacher weights", "tokenizer": "tokenizer",
    "seq_len": "data.seq_len", "rows": "number of packed rows", "data": "packed data", "k": "k",
    "temperature": "temperature (loss.temperature)", "vocab_size": "vocab size",
    "values_dtype": "values dtype", "version": "cache format version",
}


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run (missing, incomplete, made for other inputs): one actionable line."""


def index_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= (1 << 16) else torch.int32


def bytes_per_position(k: int, vocab_size: int, values_dtype: str) -> int:
    """Bytes one stored position takes (indices + values + tail + its share of nothing else)."""
    idx = torch.empty((), dtype=index_dtype(vocab_size)).element_size()
    val = torch.empty((), dtype=to_dtype(values_dtype)).element_size()
    return k * (idx + val) + 4


def fingerprint_id(fingerprint: dict) -> str:
    """A short hash of a cache's fingerprint (recorded in the checkpoints of runs that read it)."""
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SparseTargets:
    """Teacher targets of a micro-batch, dense over its ``(b, l)`` positions (zeros where nothing counts)."""

    indices: torch.Tensor  # (b, l, k) int64
    logp: torch.Tensor  # (b, l, k) float32
    tail: torch.Tensor  # (b, l) float32


class TeacherCacheStore:
    """A cache directory: ``create`` (writer side, collective-free: rank 0 writes the manifest), ``open``
    (reader side, complete caches only), ``check`` against a run's own fingerprint."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.fingerprint: dict = manifest["fingerprint"]
        self.rows_per_shard = int(manifest["rows_per_shard"])
        self.n_rows = int(self.fingerprint["rows"])
        self.k = int(self.fingerprint["k"])
        self._open: OrderedDict[int, dict] = OrderedDict()

    # -- paths and shapes ------------------------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_path(self, s: int) -> Path:
        return self.root / SHARDS / f"shard-{s:05d}.safetensors"

    def shard_rows(self, s: int) -> range:
        return range(s * self.rows_per_shard, min((s + 1) * self.rows_per_shard, self.n_rows))

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    # -- writer side -----------------------------------------------------------------------------------------

    @classmethod
    def read_manifest(cls, root: str | Path) -> dict | None:
        p = Path(root) / MANIFEST
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TeacherCacheError(f"{p}: not a teacher cache manifest ({e}); remove the directory or choose another "
                                    "--out") from e

    @classmethod
    def create(cls, root: str | Path, fingerprint: dict, rows_per_shard: int, write: bool) -> TeacherCacheStore:
        """The cache at ``root`` for ``fingerprint``: a new one, or the one a killed writer left (resumed). A
        directory holding anything else is refused. ``write``: this process writes the manifest (rank 0)."""
        root = Path(root)
        fingerprint = {**fingerprint, "version": VERSION}
        found = cls.read_manifest(root)
        if found is not None:
            store = cls(root, found)
            store.check(fingerprint, what=f"--out {root}", fix="choose a new --out, or remove it to rebuild")
            return store  # a resumed cache keeps the shard size it was started with
        # rad-ds' own files there: the builder's packed-data cache (data/), the run log, hidden lock/marker files
        if root.exists() and any(p.name not in ("data", LOG_FILE) and not p.name.startswith(".")
                                 for p in root.iterdir()):
            raise TeacherCacheError(f"--out {root} exists and is not a teacher cache; choose a new or empty --out")
        manifest = {"fingerprint": fingerprint, "rows_per_shard": int(rows_per_shard), "status": "writing"}
        store = cls(root, manifest)
        if write:
            (root / SHARDS).mkdir(parents=True, exist_ok=True)
            write_json_atomic(root / MANIFEST, manifest)
        return store

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.shard_path(s).is_file()]

    def write_shard(self, s: int, offsets: np.ndarray, indices: torch.Tensor, logp: torch.Tensor,
                    tail: torch.Tensor) -> None:
        """Shard ``s`` (all its rows), atomically: readers and a resumed writer see it whole or not at all."""
        n = len(self.shard_rows(s))
        if len(offsets) != n + 1 or int(offsets[-1]) != indices.size(0):
            raise ValueError(f"shard {s}: {len(offsets) - 1} rows / {int(offsets[-1])} positions given for {n} rows "
                             f"/ {indices.size(0)} positions")
        vocab = int(self.fingerprint["vocab_size"])
        tensors = {
            "offsets": torch.as_tensor(np.asarray(offsets, dtype=np.int64)),
            "indices": indices.to(torch.int64).to(index_dtype(vocab)).contiguous(),
            "logp": logp.to(to_dtype(self.fingerprint["values_dtype"])).contiguous(),
            "tail": tail.to(torch.float32).contiguous(),
        }
        with atomic_path(self.shard_path(s)) as tmp:
            save_file(tensors, str(tmp), metadata={"shard": str(s), "rows": f"{self.shard_rows(s).start}"})

    def finalize(self, totals: dict) -> None:
        """Mark the cache complete (rank 0, after every rank wrote its shards)."""
        missing = self.missing_shards()
        if missing:
            raise TeacherCacheError(f"teacher cache {self.root}: shards {missing[:5]} are missing; run the same "
                                    "command again to compute them")
        stored = sum(self.shard_path(s).stat().st_size for s in range(self.n_shards))
        self.manifest.update(status="complete", totals={**totals, "bytes": stored})
        write_json_atomic(self.root / MANIFEST, self.manifest)

    # -- reader side -----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> TeacherCacheStore:
        """A complete cache for reading; a one-line error for a missing or unfinished one."""
        manifest = cls.read_manifest(root)
        if manifest is None:
            raise TeacherCacheError(f"teacher.cache {root}: no {MANIFEST}; build one with launchers/teacher_cache.py "
                                    "(same teacher, data and data.seq_len as this run)")
        store = cls(root, manifest)
        if not store.complete:
            raise TeacherCacheError(f"teacher.cache {root} is unfinished ({len(store.missing_shards())} of "
                                    f"{store.n_shards} shards missing); run its launchers/teacher_cache.py command "
                                    "again to finish it")
        return store

    def check(self, expected: dict, what: str | None = None, fix: str | None = None) -> None:
        """Refuse (one line) when this cache was made from other inputs than ``expected`` says."""
        what = what or f"teacher.cache {self.root}"
        fix = fix or ("build a cache for this run with launchers/teacher_cache.py (same teacher, --data, "
                      "--seq-len, --k and loss.temperature), or drop teacher.cache")
        for key, name in FINGERPRINT_NAMES.items():
            if key in expected and self.fingerprint.get(key) != expected[key]:
                raise TeacherCacheError(f"{what} was made for {name} {self.fingerprint.get(key)!r}, this run has "
                                        f"{expected[key]!r}: {fix}")

    @property
    def id(self) -> str:
        return fingerprint_id(self.fingerprint)

    def _shard(self, s: int) -> dict:
        if s not in self._open:
            f = safe_open(str(self.shard_path(s)), framework="pt")
            self._open[s] = {"file": f, "offsets": f.get_tensor("offsets").numpy()}
            while len(self._open) > 8:  # a bounded number of open memory maps
                self._open.popitem(last=False)
        self._open.move_to_end(s)
        return self._open[s]

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (P, k) int64, logp (P, k) float32, tail (P,) float32) of packed row ``r``'s counted positions."""
        if not 0 <= r < self.n_rows:
            raise IndexError(f"row {r} is outside the teacher cache's {self.n_rows} rows")
        sh = self._shard(r // self.rows_per_shard)
        i = r % self.rows_per_shard
        a, b = int(sh["offsets"][i]), int(sh["offsets"][i + 1])
        f = sh["file"]
        return (f.get_slice("indices")[a:b].to(torch.int64), f.get_slice("logp")[a:b].to(torch.float32),
                f.get_slice("tail")[a:b].to(torch.float32))

    def targets(self, rows, target: torch.Tensor) -> SparseTargets:
        """The teacher targets of the packed ``rows`` of a micro-batch whose counted positions are ``target``
        ``(b, l)``: every counted position gets its stored entry, in row-major order (the order in which the
        losses walk the mask)."""
        b, length = target.shape
        idx = torch.zeros(b, length, self.k, dtype=torch.int64)
        logp = torch.zeros(b, length, self.k, dtype=torch.float32)
        tail = torch.zeros(b, length, dtype=torch.float32)
        mask = target.bool().cpu()
        for i, r in enumerate(np.asarray(rows).tolist()):
            pos = mask[i].nonzero().squeeze(-1)
            ri, rl, rt = self.row(int(r))
            if ri.size(0) != pos.numel():
                raise TeacherCacheError(
                    f"teacher.cache {self.root}: row {r} holds {ri.size(0)} positions, the data {pos.numel()}; the "
                    "cache was made from other data: rebuild it with this run's data settings")
            idx[i, pos], logp[i, pos], tail[i, pos] = ri, rl, rt
        return SparseTargets(idx, logp, tail)


__all__ = ["SparseTargets", "TeacherCacheError", "TeacherCacheStore", "VALUE_DTYPES", "bytes_per_position",
           "fingerprint_id", "index_dtype"]
