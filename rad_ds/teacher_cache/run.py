"""Build a teacher cache: the teacher runs once over the packed rows; every counted position keeps its top-k.

Every rank packs the same rows (the distillation's own data path, ``load_packed``), so a cache and the runs
that read it agree on rows and positions by construction (the packed data's fingerprint is in the manifest
and checked by each run). Shards (``rows_per_shard`` rows each) are dealt to the ranks round by round; a rank
writes its shard itself, atomically. A killed build resumes: the shards on disk are kept and only the missing
ones are computed. With ``teacher.location=zero3`` the teacher is a ZeRO-3 inference engine, so every rank
makes the same forwards in the same order (a rank without a shard in the last round runs a throw-away row).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rad_ds.core.dist import barrier, broadcast_object, init_distributed, release_env
from rad_ds.core.dtypes import to_dtype
from rad_ds.core.outputs import claim
from rad_ds.core.progress import progress
from rad_ds.data import load_packed, tokenizer_fingerprint
from rad_ds.data.loader import data_fingerprint
from rad_ds.data.teacher_store import TeacherCacheError, TeacherCacheStore, bytes_per_position
from rad_ds.engine.engines import BatchPlan, fill_ds_config, load_ds_config, teacher_engine
from rad_ds.engine.faults import fault_point
from rad_ds.engine.heads import FinalHidden, gathered, head_param
from rad_ds.engine.identity import streamable_source, teacher_identity
from rad_ds.engine.topk import fused_teacher_topk
from rad_ds.models.conversion import load_config, load_model, load_tokenizer, model_location
from rad_ds.models.partitioned import build_partitioned

from .config import TeacherCacheConfig

TOPK_CHUNK_TOKENS = 1024  # positions projected through the LM head at a time (chunk x vocab float32 alive)

logger = logging.getLogger(__name__)


@dataclass
class CacheSummary:
    out: Path
    rows: int
    positions: int
    shards_computed: int
    seconds: float
    bytes: int
    bytes_per_position: float
    k: int

    def line(self) -> str:
        return (f"teacher cache {self.out}: {self.rows} rows, {self.positions} positions, k={self.k}, "
                f"{self.bytes_per_position:.0f} bytes/position ({self.bytes / 2**20:.1f} MiB); computed "
                f"{self.shards_computed} shard(s) in {self.seconds:.1f} s")


def build_teacher_cache(cfg: TeacherCacheConfig) -> CacheSummary:
    """Build (or finish) the cache of ``cfg``; collective: call it on every rank."""
    cfg.validate()
    info = init_distributed(cfg.dist_timeout_s, deepspeed=cfg.teacher.location == "zero3")
    try:
        # claimed before anything is written into it (a killed build, or a finished one, resumes: the manifest's
        # fingerprint refuses a cache made for other inputs)
        with claim(cfg.out, "teacher_cache", resume=True, rank=info.rank) as output:
            summary = _CacheBuild(cfg, info.rank, info.world).run()
            output.finish()
            return summary
    finally:
        release_env()


def _fingerprint(cfg, config, tok, packed) -> dict:
    return {
        **teacher_identity(cfg.teacher.path, cfg.teacher.gguf_file, config),
        "teacher": str(cfg.teacher.path), "teacher_dtype": cfg.teacher.dtype,
        "tokenizer": tokenizer_fingerprint(tok), "seq_len": int(cfg.data.seq_len), "rows": len(packed),
        "data": data_fingerprint(packed), "k": int(min(cfg.k, config.vocab_size)),
        "temperature": float(cfg.temperature), "vocab_size": int(config.vocab_size),
        "values_dtype": cfg.values_dtype,
    }


class _CacheBuild:
    def __init__(self, cfg: TeacherCacheConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.out)

    def run(self) -> CacheSummary:
        cfg = self.cfg
        t0 = time.perf_counter()
        config = load_config(cfg.teacher.path, cfg.teacher.gguf_file)
        tok = load_tokenizer(*model_location(cfg.teacher.path, cfg.teacher.gguf_file))
        if tok is None:
            raise TeacherCacheError(f"teacher.path {cfg.teacher.path}: no tokenizer found; the cache needs it to "
                                    "read --data")
        self.packed = load_packed(cfg.data, tok, self.out / "data")
        fingerprint = _fingerprint(cfg, config, tok, self.packed)
        self.store = self._open_store(fingerprint)
        missing = broadcast_object(self.store.missing_shards() if self.rank == 0 else None)
        if missing:
            self.teacher = self._teacher(config)
            self._compute(missing)
        barrier()
        if self.rank == 0 and not self.store.complete:
            positions = int(self.packed.target.sum())
            self.store.finalize({"rows": len(self.packed), "positions": positions,
                                 "bytes_per_position_nominal": bytes_per_position(
                                     self.store.k, config.vocab_size, cfg.values_dtype)})
        barrier()
        store = TeacherCacheStore.open(self.out)
        totals = store.manifest["totals"]
        return CacheSummary(self.out, totals["rows"], totals["positions"], len(missing), time.perf_counter() - t0,
                            totals["bytes"], totals["bytes"] / max(totals["positions"], 1), store.k)

    def _open_store(self, fingerprint: dict) -> TeacherCacheStore:
        """Rank 0 creates (or resumes) the cache and writes its manifest; the others read it after. An error
        on rank 0 (a directory made for other inputs) reaches every rank, so none waits in a collective."""
        err = None
        if self.rank == 0:
            try:
                TeacherCacheStore.create(self.out, fingerprint, self.cfg.rows_per_shard, write=True)
            except TeacherCacheError as e:
                err = str(e)
        err = broadcast_object(err)
        if err is not None:
            raise TeacherCacheError(err)
        return TeacherCacheStore.create(self.out, fingerprint, self.cfg.rows_per_shard, write=False)

    def _teacher(self, config):
        """The teacher on this rank: whole (replicated) or a ZeRO-3 inference engine (collective)."""
        cfg, dtype = self.cfg, to_dtype(self.cfg.teacher.dtype)
        if cfg.teacher.location == "replicated":
            model, _ = load_model(cfg.teacher.path, gguf_file=cfg.teacher.gguf_file, dtype=dtype)
            model.eval().requires_grad_(False)
            return model
        t_ds = fill_ds_config(load_ds_config(cfg.teacher.deepspeed), BatchPlan(cfg.micro_batch, 1, self.world),
                              cfg.teacher.dtype, cfg.teacher.deepspeed, offload_params=cfg.teacher.offload,
                              optimizer=False, model_config=config)
        source = streamable_source(cfg.teacher.path, cfg.teacher.gguf_file)
        if source is not None:
            model = build_partitioned(config, source, t_ds, dtype).model
        else:
            model, _ = load_model(cfg.teacher.path, gguf_file=cfg.teacher.gguf_file, dtype=dtype)
        return teacher_engine(model, t_ds)

    def _compute(self, missing: list[int]) -> None:
        cfg, world, rank = self.cfg, self.world, self.rank
        lockstep = cfg.teacher.location == "zero3"  # every rank must run the same forwards
        rounds = -(-len(missing) // world)
        per_shard = -(-self.store.rows_per_shard // cfg.micro_batch)
        bar = None
        if cfg.progress and rank == 0:
            bar = progress(len(missing), "teacher cache", "shard")  # a bar on a terminal, log lines in a log
        for r in range(rounds):
            i = r * world + rank
            shard = missing[i] if i < len(missing) else None
            rows = np.arange(self.store.shard_rows(shard).start, self.store.shard_rows(shard).stop) \
                if shard is not None else np.zeros(0, dtype=np.int64)
            parts = []
            for j in range(per_shard if lockstep else -(-len(rows) // cfg.micro_batch)):
                chunk = rows[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
                if len(chunk):
                    parts.append(self._topk(chunk))
                else:
                    self._topk(np.zeros(1, dtype=np.int64))  # keeps the ZeRO-3 gathers in step
            if shard is not None:
                self._write(shard, rows, parts)
                fault_point("cache_after_shard", shard, rank)
            if bar is not None:
                bar.update(min(world, len(missing) - r * world))
        if bar is not None:
            bar.close()

    @torch.no_grad()
    def _topk(self, rows: np.ndarray):
        """(per-row position counts, indices, log-probabilities, tails) of ``rows``' counted positions.

        The LM head runs only on counted positions, ``TOPK_CHUNK_TOKENS`` at a time (fused.py): no
        ``tokens x vocab`` logits for the whole micro-batch (8 GB of float32 at 4 x 4096 x 128256)."""
        p = self.packed
        ids = torch.from_numpy(p.input_ids[rows].astype(np.int64))
        pos = torch.from_numpy(p.position_ids[rows].astype(np.int64))
        target = torch.from_numpy(p.target[rows].astype(bool))
        device = getattr(self.teacher, "device", torch.device("cpu"))
        rows_sel = target.reshape(-1).nonzero().squeeze(-1).to(device)
        if self.cfg.teacher.location == "replicated":
            h = self.teacher.model(ids.to(device), position_ids=pos.to(device), use_cache=False).last_hidden_state
        else:  # a ZeRO-3 engine: through its own forward (which gathers the partitions), one position's logits
            final = FinalHidden(self.teacher)
            try:
                self.teacher(ids.to(device), position_ids=pos.to(device), use_cache=False, logits_to_keep=1)
                h = final.take()
            finally:
                final.remove()
        sel = h.reshape(-1, h.size(-1)).index_select(0, rows_sel)
        weight = head_param(self.teacher)
        with gathered(weight):  # ZeRO-3: the whole head for the length of the projection (collective)
            idx, top, tail = fused_teacher_topk(sel, weight, self.store.k, self.cfg.temperature, TOPK_CHUNK_TOKENS)
        return target.sum(-1).numpy(), idx.cpu(), top.float().cpu(), tail.float().cpu()

    def _write(self, shard: int, rows: np.ndarray, parts: list) -> None:
        counts = np.concatenate([c for c, *_ in parts]) if parts else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        k = self.store.k
        cat = (lambda xs, *shape: torch.cat(xs) if xs else torch.zeros(0, *shape))  # noqa: E731
        self.store.write_shard(shard, offsets, cat([x[1] for x in parts], k), cat([x[2] for x in parts], k),
                               cat([x[3] for x in parts]))


__all__ = ["CacheSummary", "build_teacher_cache"]
