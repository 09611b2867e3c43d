"""A resumable, world-size-independent distributed sampler over packed rows.

The sampler draws **global** batches: every rank computes the same permutation (seeded by ``seed`` and
the epoch) and the same sequence of global batches, then takes its own share. Its state is two numbers
(epoch, rows consumed in that epoch), saved with every checkpoint, so a resumed run continues with the
next unseen batch (nothing replayed, nothing skipped), also on a different number of ranks: the global
batch stays the same and is only split differently. The last incomplete batch of an epoch is dropped.
"""

from __future__ import annotations

import numpy as np


class ResumableSampler:
    def __init__(self, num_rows: int, global_batch: int, seed: int = 0, shuffle: bool = True):
        if num_rows < global_batch:
            raise ValueError(
                f"the data has {num_rows} packed sequences but one step needs a global batch of {global_batch}; "
                "add data, or lower train.micro_batch / train.grad_accum / data.seq_len"
            )
        self.num_rows, self.global_batch = int(num_rows), int(global_batch)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._perm = np.arange(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def next_global_batch(self) -> np.ndarray:
        """Row indices of the next global batch (the same on every rank)."""
        if self.offset + self.global_batch > self.num_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._permutation(self.epoch)[self.offset:self.offset + self.global_batch]
        self.offset += self.global_batch
        return idx

    @staticmethod
    def shard(global_idx: np.ndarray, rank: int, world: int, grad_accum: int) -> list[np.ndarray]:
        """This rank's micro-batches of a global batch: rank ``r`` takes the ``r``-th contiguous share,
        split into ``grad_accum`` micro-batches."""
        per_rank = len(global_idx) // world
        mine = global_idx[rank * per_rank:(rank + 1) * per_rank]
        return np.array_split(mine, grad_accum)

    @property
    def rows_seen(self) -> int:
        return self.epoch * (self.num_rows - self.num_rows % self.global_batch) + self.offset

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_rows": self.num_rows,
                "global_batch": self.global_batch, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        saved = (int(state["num_rows"]), int(state["seed"]), bool(state["shuffle"]))
        if saved != (self.num_rows, self.seed, self.shuffle):
            raise ValueError(
                f"the checkpoint's data order was over {state['num_rows']} rows (seed {state['seed']}, shuffle "
                f"{state['shuffle']}); now {self.num_rows} rows (seed {self.seed}, shuffle {self.shuffle}). Resume "
                "with the same data, data.seq_len, data.packing and train.seed, or start a new run"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        # a changed global batch keeps the position in rows: the next batch starts at the first unseen row
        self._perm_epoch = None


__all__ = ["ResumableSampler"]
