"""ImageNet-style image folders: <root>/train/<class>/<image> for training and validation (carved
from it), <root>/val/<class>/<image> as the held-out test split.

Images are decoded per batch by `num_workers` worker processes with timm's transforms, as timm's
own training script does. Every sample's augmentation is seeded from (run seed, epoch, position), so
an epoch is the same with any number of workers and a resumed run replays it.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from ablate.data.config import DataConf
from ablate.data.errors import UNREADABLE, DataError, Reported, collate_reported, raise_reported, unreadable
from ablate.data.seeding import epoch_generator, seeded_global_rngs
from ablate.data.sources import TensorSplit

__all__ = ["FolderSplit", "EpochSampler", "FolderLoader", "scan_folder", "folder_transforms",
           "decode_folder"]

LAYOUT = ("<root>/train/<class>/<image> and <root>/val/<class>/<image> (the ImageNet layout: "
          "train/n01440764/n01440764_10026.JPEG; extensions " + " ".join(IMG_EXTENSIONS) + ")")


def scan_folder(root: str, split: str) -> ImageFolder:
    """The class folders and image files of <root>/<split>, or a DataError naming the layout."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(root) else f"has no {split}/ folder"
        raise DataError(f"image folder data set not found: {root} {what}. data.root must hold {LAYOUT}. "
                        f"Set data.root=/path/to/imagenet.")
    try:
        return ImageFolder(path)  # scans only; images are opened by FolderSplit
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise DataError(f"image folder data set in {path} is unusable: {err} data.root must hold "
                        f"{LAYOUT}. Fix the folder or set data.root= to another one.") from err


class FolderSplit(Dataset):
    """(image, label) of a list of (path, label) samples through `transform`.

    Indexed by `i` (no randomness: evaluation, decoding) or by `(i, seed)`: the transform's random
    draws are then seeded by `seed` alone (see seeded_global_rngs).
    """

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            image = default_loader(path)  # RGB (decoding happens here, in the conversion)
        except UNREADABLE as err:
            raise unreadable(path, err) from err
        if seed is None:
            return self.transform(image), label
        with seeded_global_rngs(seed):
            return self.transform(image), label


class EpochSampler(Sampler):
    """Yields this rank's keys of an epoch: indices in order (eval), or (index, sample seed) in an
    order and with seeds drawn from (seed, epoch) alone (train)."""

    def __init__(self, indices: torch.Tensor, *, train: bool, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.indices = indices.to(torch.int64).cpu()
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keys(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(self.indices)
        if not self.train:
            return self.indices[self.rank::self.world_size], None
        g = epoch_generator(self.seed, epoch)
        order = self.indices[torch.randperm(n, generator=g)]
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        keep = slice(self.rank, (n // self.world_size) * self.world_size, self.world_size)
        return order[keep], seeds[keep]

    def __iter__(self):
        order, seeds = self.keys(self.epoch)
        if seeds is None:
            return iter(order.tolist())
        return iter(zip(order.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))


class FolderLoader:
    """Iterate (images float32 normalized (B, C, H, W), labels int64 (B,)) on `device`, decoded by
    a torch DataLoader with `num_workers` processes. Train: order and augmentation from (seed, epoch),
    last incomplete batch dropped; eval: the order of `indices`, every sample."""

    def __init__(self, dataset: FolderSplit, indices: torch.Tensor, *, batch_size: int,
                 device: torch.device, train: bool, seed: int = 0, num_workers: int = 0,
                 split: str = "train", rank: int = 0, world_size: int = 1):
        self.device, self.train, self.split, self.batch_size = torch.device(device), train, split, batch_size
        self.num_workers = num_workers
        self.sampler = EpochSampler(indices, train=train, seed=seed, rank=rank, world_size=world_size)
        self.loader = DataLoader(
            Reported(dataset), batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            collate_fn=collate_reported,  # a damaged image: its DataError, not the worker's traceback
            drop_last=train, pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,  # no re-forking every epoch
            # its own generator: a DataLoader draws its workers' base seed per epoch from the global
            # RNG otherwise, shifting the model's dropout draws (samples are seeded by the sampler)
            generator=torch.Generator())

    @property
    def indices(self) -> torch.Tensor:
        return self.sampler.indices

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The source indices this rank sees in `epoch` (default: the current one), in order."""
        order = self.sampler.keys(self.epoch if epoch is None else epoch)[0]
        return order[:len(self) * self.batch_size] if self.train else order

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            images, labels = raise_reported(batch)
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, dtype=torch.int64, non_blocking=True))

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"FolderLoader({kind}, split={self.split}, samples={len(self.indices)}, batches={len(self)}, "
                f"batch_size={self.batch_size}, num_workers={self.num_workers}, device={self.device})")


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as Pillow gave it before 13, which
    refuses 0 bits (ValueError): RandAugment's increasing posterize keeps 0 bits at magnitude 10,
    which the ImageNet config's m9 with mstd0.5 draws about one time in 40."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def _posterize_safely(transform) -> None:
    """Give every augmentation op of `transform` (RandAugment's, AugMix's, an AutoAugment policy's)
    the posterize above in place of timm's."""
    for step in getattr(transform, "transforms", [transform]):
        ops = list(getattr(step, "ops", []))
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def folder_transforms(conf: DataConf):
    """(train, eval) transforms of timm: RandomResizedCrop + flip + RandAugment + random erasing for
    training, resize to img_size / crop_pct + centre crop for evaluation; both normalize."""
    common = dict(input_size=(conf.in_chans, conf.img_size, conf.img_size), interpolation=conf.interpolation,
                  mean=tuple(conf.mean), std=tuple(conf.std))
    train = create_transform(is_training=True, hflip=0.5 if conf.hflip else 0.0,
                             auto_augment=conf.auto_augment, re_prob=conf.reprob, re_mode="pixel",
                             re_count=1, **common)
    _posterize_safely(train)
    evaluate = create_transform(is_training=False, crop_pct=conf.crop_pct, **common)
    return train, evaluate


def decode_folder(samples: list[tuple[str, int]], classes: list[str], img_size: int, interpolation: str,
                  num_workers: int) -> TensorSplit:
    """Decode every image once (shorter side resized to img_size, centre crop) into uint8 tensors,
    for folders small enough to be held in memory (data.in_memory=true)."""
    mode = transforms.InterpolationMode(interpolation if interpolation != "random" else "bilinear")
    decode = transforms.Compose([transforms.Resize(img_size, interpolation=mode),
                                 transforms.CenterCrop(img_size), transforms.PILToTensor()])
    loader = DataLoader(Reported(FolderSplit(samples, decode)), batch_size=256, num_workers=num_workers,
                        collate_fn=collate_reported)
    images, labels = zip(*map(raise_reported, loader))
    return TensorSplit(torch.cat(images), torch.cat(labels).to(torch.int64), list(classes))
