"""The structured schema of `conf/data/*.yaml`.

The training schema holds it as its field `data`, so a misspelt key fails at composition. `name` is a
plain string, checked by `build_data` against the registered data sets (ablate.data.build.BUILDERS),
so a user can register another one without touching this schema.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

__all__ = ["DataConf"]


@dataclass
class DataConf:
    name: str = MISSING  # fashion_mnist | cifar10 | cifar100 | imagenet | imagefolder
    # fashion_mnist reads <root>/FashionMNIST/raw, cifar10 <root>/cifar-10-batches-py, cifar100
    # <root>/cifar-100-python, imagenet <root>/train/<class>/* and <root>/val/<class>/*. A relative root
    # is relative to the directory the app was started from.
    root: str = "${oc.env:ABLATE_DATA,data}"
    download: bool = True  # only when the local files are missing (the image folders never download)
    img_size: int = MISSING  # small sets are resized once when it differs from the stored size
    in_chans: int = MISSING
    num_classes: int = MISSING
    # Validation: `val_size` samples carved from the training files, stratified by class, with a split
    # seed that is fixed (ablate.data.split.SPLIT_SEED), not the run's seed: every run of a sweep selects
    # its model on the same images. The test split (the official test / val files) stays held out.
    val_size: int = 5000
    train_subset: int | None = None  # stratified subset of what is left of train, for quick runs
    test_subset: int | None = None  # stratified subset of the test split, for quick runs only
    batch_size: int = 128  # per process (torchrun: each rank loads this many)
    eval_batch_size: int = 1024
    num_workers: int = 0  # image folders: decoding worker processes; in-memory sets need none
    # true: decode the whole set once into a uint8 tensor on the training device and augment batches
    # there; false: small sets stay in host memory (batches are copied over), image folders are read
    # per batch by `num_workers` processes with timm's transforms.
    in_memory: bool = True
    mean: list[float] = MISSING  # per channel, of images scaled to [0, 1]
    std: list[float] = MISSING
    # augmentation of in-memory sets, batched on the device: a random crop from the image zero-padded
    # by `crop_padding` pixels on each side, and a horizontal flip with probability 1/2
    crop_padding: int = 0
    hflip: bool = False
    # augmentation of image folders read per batch (timm's create_transform; Swin/DeiT recipe values):
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    reprob: float = 0.0  # random-erasing probability
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then centre-crop img_size
