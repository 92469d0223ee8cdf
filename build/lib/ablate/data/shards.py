"""Which samples of an epoch one process sees, for every loader of the training data.

An epoch's order (and its augmentation) is drawn for all of a loader's `indices` before sharding, so
every rank agrees on it and world_size processes see together what one process sees; rank r takes
every world_size-th sample. Training drops the last incomplete batch, so every rank takes the same
number of steps (DDP's ranks must step together); evaluation keeps every sample.
"""
from __future__ import annotations

import math

import torch

__all__ = ["EpochShards"]


class EpochShards:
    """Mixin of a loader with `indices`, `batch_size`, `train`, `rank`, `world_size` and `epoch`."""

    indices: torch.Tensor
    batch_size: int
    train: bool
    rank: int
    world_size: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.indices)
        if self.train:
            return (n // self.world_size) // self.batch_size * self.batch_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def shard(self, *drawn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's part of tensors drawn for a whole training epoch (one entry per sample)."""
        n = len(self.indices)
        keep = slice(self.rank, (n // self.world_size) * self.world_size, self.world_size)
        take = slice(0, self.num_samples)
        return tuple(t[keep][take] for t in drawn)
