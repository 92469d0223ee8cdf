"""A loader over a uint8 image tensor held in memory (on the training device where it fits).

A micro model on Fashion-MNIST or CIFAR does a step in milliseconds; a DataLoader that decodes PIL
images per sample in worker processes would be the bottleneck. Here a batch is one index into the
stored tensor plus a few batched tensor ops (crop, flip, normalize) on the device.
"""
from __future__ import annotations

import torch

from ablate.data.augment import Normalize, crop_flip, draw_crop_flip
from ablate.data.seeding import epoch_generator
from ablate.data.shards import EpochShards

__all__ = ["TensorLoader"]


class TensorLoader(EpochShards):
    """Iterate (images float32 normalized (B, C, H, W), labels int64 (B,)) on `device`.

    images / labels: a whole source split (the training or the test files), stored on `device` or on
    the CPU (batches are then copied over). `indices`: the members of this loader's split, into the
    source. A training loader (`train=True`) reshuffles and augments each epoch from (seed, epoch) only
    and drops the last incomplete batch; an eval loader keeps the order of `indices` and every sample.
    Under torchrun, rank r of `world_size` gets every world_size-th sample of the epoch's order.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, *, batch_size: int,
        device: torch.device, mean: list[float], std: list[float], train: bool, seed: int = 0,
        crop_padding: int = 0, hflip: bool = False, split: str = "train", rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.labels = images, labels
        self.indices = indices.to(torch.int64).cpu()
        self.batch_size, self.device, self.train, self.seed = batch_size, torch.device(device), train, seed
        self.crop_padding, self.hflip, self.split = crop_padding, hflip, split
        self.rank, self.world_size = rank, world_size
        self.normalize = Normalize(mean, std, self.device)
        self.epoch = 0

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The source indices this rank sees in `epoch` (default: the current one), in order."""
        return self._draw(self.epoch if epoch is None else epoch)[0]

    def _draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not self.train:
            return self.indices[self.rank::self.world_size], None, None
        g = epoch_generator(self.seed, epoch)
        n = len(self.indices)
        order = self.indices[torch.randperm(n, generator=g)]
        # draw for the whole epoch before sharding, so every rank agrees and one process sees what
        # world_size processes see together
        offsets, flips = draw_crop_flip(n, self.crop_padding, self.hflip, g)
        return self.shard(order, offsets, flips)

    def __iter__(self):
        order, offsets, flips = self._draw(self.epoch)
        store = self.images.device
        order = order.to(store)  # one transfer per epoch, not per batch
        if self.train:
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        bs = self.batch_size
        for start in range(0, len(order) if not self.train else len(self) * bs, bs):
            idx = order[start:start + bs]
            x = self.images[idx].to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
            if self.train and (self.crop_padding or self.hflip):
                x = crop_flip(x, offsets[start:start + bs], flips[start:start + bs], self.crop_padding)
            yield self.normalize(x), y

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"TensorLoader({kind}, split={self.split}, samples={len(self.indices)}, "
                f"batches={len(self)}, batch_size={self.batch_size}, image={tuple(self.images.shape[1:])}, "
                f"store={self.images.device}, device={self.device}, crop_padding={self.crop_padding}, "
                f"hflip={self.hflip})")
