"""Batches of random contiguous windows from a token shard.

A batch is a pure function of (seed, step, rank): no iterator state, so a run resumed at
step k sees exactly the batches it would have seen, and ranks see different windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.errors import DataError
from nanoseek.data.shards import open_split, read_meta

_SPLIT_CODE = {"train": 0, "val": 1}  # so a train and a val loader never share windows


def _check_split(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise DataError(
            f"batch size {batch_size} (over all ranks) does not split evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )


class BatchLoader:
    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        _check_split(batch_size, world_size)
        self.meta = read_meta(shard_dir)
        self.data = open_split(shard_dir, split, self.meta)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if len(self.data) < seq_len + 1:
            raise DataError(
                f"{shard_dir}: the {split} split has {len(self.data):,} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len or more text"
            )
        s = self.meta["splits"][split]
        self.bytes_per_token = s["bytes"] / s["tokens"]

    @property
    def n_tokens(self) -> int:
        return len(self.data)

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        chunk = torch.from_numpy(np.asarray(self.data[idx], dtype=np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # x, y: (B, T)

    def get_batch(
        self, step: int, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the step's batch. The batch (`batch_size` windows over all
        ranks; default the loader's) is a pure function of (seed, step, batch_size): N
        processes train on what one process would."""
        n = batch_size or self.batch_size
        _check_split(n, self.world_size)
        rng = np.random.default_rng([self.seed, step, 0, _SPLIT_CODE.get(self.split, 2)])
        starts = rng.integers(0, len(self.data) - self.seq_len, size=n)
        return self._windows(starts[self.rank :: self.world_size])

    def val_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same n_batches every call: windows evenly spaced over the split, this rank's
        share of them, so validation losses are comparable across steps, runs and numbers of
        ranks."""
        starts = np.linspace(0, len(self.data) - self.seq_len - 1, n_batches * self.batch_size)
        mine = starts.astype(np.int64)[self.rank :: self.world_size]
        local = self.batch_size // self.world_size
        for b in range(n_batches):
            yield self._windows(mine[b * local : (b + 1) * local])

    def bits_per_byte(self, loss: float) -> float:
        """Mean cross-entropy per token (nats) -> bits per byte of text, comparable across
        tokenizers."""
        return loss / math.log(2) / self.bytes_per_token
