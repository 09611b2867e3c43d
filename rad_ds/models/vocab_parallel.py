"""A frozen embedding and LM head split by vocabulary rows over the ranks: no rank holds the whole matrix.

Under ZeRO-3 each rank runs its own tokens (data parallelism), so unlike Megatron's vocab-parallel layers
(tensor-parallel ranks that share their tokens) a rank needs the other ranks' rows for most of its tokens.
:class:`VocabParallelEmbedding` all-gathers the ranks' token ids (a few integers), looks up the ids that fall
in its own rows with the others zeroed, and one all-reduce (a sum) of the ``(all ranks' tokens, hidden)``
embeddings completes every row; each rank keeps its own tokens'. :class:`VocabParallelHead` holds the same
rows for the LM head: the fused loss (``rad_ds.distill.vocab_parallel``) projects onto them with a cross-rank
log-sum-exp and never makes whole logits; its ``forward`` (generation, evaluation) all-gathers the logits.

The rows are a non-persistent buffer, not a parameter: DeepSpeed never partitions, gathers, broadcasts or
checkpoints them (only parameters are), and a run reads them from the base's safetensors files, rows
``[lo, hi)`` only. Every rank must call each forward, in the same order (collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .weights import WeightSource


@dataclass(frozen=True)
class VocabShard:
    """Rows ``[lo, hi)`` of a vocabulary of ``vocab`` rows, this rank's of ``world`` (``ceil(vocab / world)``
    rows per rank, the last ranks' fewer or none)."""

    vocab: int
    lo: int
    hi: int
    rank: int
    world: int

    @classmethod
    def of(cls, vocab: int, rank: int, world: int) -> VocabShard:
        per = -(-vocab // world)
        lo = min(rank * per, vocab)
        return cls(vocab, lo, min(lo + per, vocab), rank, world)

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def per(self) -> int:
        return -(-self.vocab // self.world)


def _dist():
    return torch.distributed


def gather_rows(x: torch.Tensor, world: int, counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``x`` ``(n_r, ...)`` concatenated in rank order, and the ``n_r`` (pass ``counts`` back to
    skip their exchange for a second tensor of the same rows). Collective; not differentiable."""
    if world == 1:
        return x, [x.size(0)]
    dist = _dist()
    if counts is None:
        n = torch.tensor([x.size(0)], dtype=torch.long, device=x.device)
        got = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(got, n)
        counts = [int(c) for c in got]
    m = max(counts)
    pad = x.new_zeros((m, *x.shape[1:]))
    pad[: x.size(0)] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


def own_slice(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


class VocabParallelEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` of which this rank holds rows ``shard.lo:shard.hi`` (see the module doc)."""

    def __init__(self, weight: torch.Tensor, shard: VocabShard):
        super().__init__()
        if weight.size(0) != shard.rows:
            raise ValueError(f"vocab shard rows {shard.lo}:{shard.hi} but a weight of {weight.size(0)} rows")
        self.shard = shard
        self.num_embeddings, self.embedding_dim, self.padding_idx = shard.vocab, weight.size(1), None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sh = self.shard
        flat = input_ids.reshape(-1)
        ids, counts = gather_rows(flat, sh.world)
        local = ids - sh.lo
        inside = (local >= 0) & (local < sh.rows)
        out = torch.zeros(ids.numel(), self.embedding_dim, dtype=self.weight.dtype, device=self.weight.device)
        if sh.rows:
            out[inside] = self.weight.index_select(0, local[inside])
        if sh.world > 1:
            _dist().all_reduce(out)  # one rank holds each row, the others add zeros: exact in any dtype
        return out[own_slice(counts, sh.rank)].reshape(*input_ids.shape, self.embedding_dim)


class VocabParallelHead(nn.Module):
    """A frozen bias-free LM head of which this rank holds rows ``shard.lo:shard.hi``. ``forward`` gives whole
    logits (all-gathered: generation and evaluation, not differentiable); training uses the rows directly."""

    def __init__(self, weight: torch.Tensor, shard: VocabShard):
        super().__init__()
        if weight.size(0) != shard.rows:
            raise ValueError(f"vocab shard rows {shard.lo}:{shard.hi} but a weight of {weight.size(0)} rows")
        self.shard = shard
        self.in_features, self.out_features = weight.size(1), shard.vocab
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and h.requires_grad:
            raise RuntimeError("VocabParallelHead.forward is not differentiable: training takes the fused "
                               "vocab-parallel loss (rad_ds.distill.vocab_parallel); set student.vocab_parallel=false")
        sh = self.shard
        flat = h.reshape(-1, h.size(-1))
        rows, counts = gather_rows(flat, sh.world)
        local = F.linear(rows, self.weight)
        if sh.world == 1:
            return local.reshape(*h.shape[:-1], sh.vocab)
        pad = local.new_zeros(rows.size(0), sh.per)
        pad[:, : sh.rows] = local
        parts = [torch.empty_like(pad) for _ in range(sh.world)]
        _dist().all_gather(parts, pad)
        full = torch.cat([p[own_slice(counts, sh.rank)] for p in parts], dim=-1)[:, : sh.vocab]
        return full.reshape(*h.shape[:-1], sh.vocab)


def shard_vocab(model: nn.Module, source: WeightSource, rank: int, world: int, dtype: torch.dtype) -> VocabShard:
    """Replace ``model``'s embedding and LM head (a ``RadHybridForCausalLM``, ZeRO-3-partitioned or not) by
    vocab-parallel ones holding rows ``[lo, hi)`` read from ``source``; a tied pair shares one buffer. The old
    modules are dropped before the rows are read, so their partitions are freed first."""
    config = model.config
    shard = VocabShard.of(int(config.vocab_size), rank, world)
    emb_name = "model.embed_tokens.weight"
    head_name = "lm_head.weight"
    tied = bool(config.tie_word_embeddings) or head_name not in source
    model.model.embed_tokens = None  # the ZeRO-3 partitions (or whole tensors) go with the modules
    model.lm_head = None
    emb = source.rows(emb_name, shard.lo, shard.hi).to(dtype).contiguous()
    head = emb if tied else source.rows(head_name, shard.lo, shard.hi).to(dtype).contiguous()
    model.model.embed_tokens = VocabParallelEmbedding(emb, shard)
    model.lm_head = VocabParallelHead(head, shard)
    return shard


__all__ = ["VocabParallelEmbedding", "VocabParallelHead", "VocabShard", "gather_rows", "own_slice", "shard_vocab"]
