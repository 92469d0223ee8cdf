"""conf.data -> Data: the train / val / test loaders of a run.

The data set name picks a builder from BUILDERS (a registry, not an if-chain): the small sets are
decoded into uint8 tensors and served by TensorLoader; image folders are served by FolderLoader, or
decoded into tensors too when `data.in_memory=true`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ablate.data.config import DataConf
from ablate.data.dense import CocoSplit, DenseLoader, ade_split, carve, coco_split
from ablate.data.errors import DataError
from ablate.data.folder import FolderLoader, FolderSplit, decode_folder, folder_transforms, scan_folder
from ablate.data.memory import TensorLoader
from ablate.data.sources import TENSOR_SOURCES, TensorSplit
from ablate.data.split import SPLIT_SEED, stratified_split

__all__ = ["Data", "BUILDERS", "build_data", "as_data_conf"]

Loader = TensorLoader | FolderLoader | DenseLoader


@dataclass
class Data:
    """What a training loop needs of its data. Each loader yields (images, labels) on the device, has
    len() (batches per epoch) and set_epoch(epoch); `indices` are its members in its source files."""

    train: Loader
    val: Loader
    test: Loader
    num_classes: int
    in_chans: int
    img_size: int
    train_size: int
    val_size: int
    test_size: int
    classes: list[str] = field(default_factory=list)


def as_data_conf(conf: DataConf | DictConfig | dict) -> DataConf:
    """A DataConf with every interpolation resolved and every field checked against the schema."""
    if isinstance(conf, DictConfig):  # resolve inside its parent: ${model.img_size} etc. still work
        conf = OmegaConf.to_container(conf, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConf), conf))


def build_data(conf: DataConf | DictConfig, device: torch.device, seed: int, *, rank: int = 0,
               world_size: int = 1) -> Data:
    """The loaders of `conf` (conf/data/*.yaml). `seed` (the run's seed) drives the training order and
    augmentation only; the validation split and the subset use the fixed SPLIT_SEED. Under torchrun,
    pass rank and world_size: each rank then loads its share of every epoch (batch_size per rank)."""
    conf = as_data_conf(conf)
    builder = BUILDERS.get(conf.name)
    if builder is None:
        raise DataError(f"unknown data set data.name={conf.name!r}; registered: {sorted(BUILDERS)} "
                        f"(conf/data/ has one file each: data=fashion_mnist, data=cifar10, ...).")
    _check_settings(conf)
    return builder(conf, torch.device(device), seed, rank, world_size)


def _check_settings(conf: DataConf) -> None:
    """The ranges of ablate/schema.py (for callers that did not validate the whole config), then how
    the fields relate."""
    from ablate.schema import ConfigError, validate_config

    try:
        validate_config(OmegaConf.structured(conf), DataConf, prefix="data.")
    except ConfigError as err:  # the data set's own kind of error, for callers of build_data
        raise DataError(str(err)) from None
    for key in ("mean", "std"):
        if len(getattr(conf, key)) != conf.in_chans:
            raise DataError(f"data.{key} has {len(getattr(conf, key))} values for data.in_chans="
                            f"{conf.in_chans} channels: give one value per channel.")


def _check_classes(conf: DataConf, labels: torch.Tensor, classes: list[str], where: str) -> None:
    found = max(len(classes), int(labels.max()) + 1 if len(labels) else 0)
    if found != conf.num_classes:
        raise DataError(f"{where} holds {found} classes but data.num_classes={conf.num_classes}: set "
                        f"data.num_classes={found}.")


def _check_channels(conf: DataConf, channels: int) -> None:
    if channels != conf.in_chans:
        raise DataError(f"{conf.name} images have {channels} channels but data.in_chans={conf.in_chans}: "
                        f"set data.in_chans={channels} (and one data.mean / data.std value per channel).")


def _check_batches(conf: DataConf, train_size: int, world_size: int) -> None:
    if train_size // world_size < conf.batch_size:
        raise DataError(f"data.batch_size={conf.batch_size} is larger than the training split "
                        f"({train_size} samples{f' over {world_size} ranks' if world_size > 1 else ''}), so "
                        f"an epoch would have no batch: lower data.batch_size or raise data.train_subset.")


def _test_indices(conf: DataConf, labels: torch.Tensor) -> torch.Tensor:
    """All of the test split, or a stratified `data.test_subset` of it (quick runs and tests only)."""
    if conf.test_subset is None:
        return torch.arange(len(labels))
    if not conf.num_classes <= conf.test_subset <= len(labels):
        raise DataError(f"data.test_subset={conf.test_subset} does not fit: the test split holds "
                        f"{len(labels)} samples of {conf.num_classes} classes. Set it between "
                        f"{conf.num_classes} and {len(labels)}, or null for all of it.")
    return stratified_split(labels, conf.num_classes, 0, conf.test_subset)[0]


def _resize(images: torch.Tensor, size: int, interpolation: str, chunk: int = 4096) -> torch.Tensor:
    """uint8 images resized once (antialiased), when data.img_size differs from the files' size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
    out = [F.interpolate(part.float(), size=(size, size), mode=mode, antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for part in images.split(chunk)]
    return torch.cat(out)


def _tensor_data(conf: DataConf, train: TensorSplit, test: TensorSplit, where: str, device: torch.device,
                 seed: int, rank: int, world_size: int) -> Data:
    """Data of decoded splits, held on `device` (in_memory) or in host memory."""
    _check_channels(conf, train.images.shape[1])
    _check_classes(conf, train.labels, train.classes, where)
    train_idx, val_idx = stratified_split(train.labels, conf.num_classes, conf.val_size, conf.train_subset)
    test_idx = _test_indices(conf, test.labels)
    _check_batches(conf, len(train_idx), world_size)
    store = device if conf.in_memory else torch.device("cpu")
    train_images = _resize(train.images, conf.img_size, conf.interpolation).to(store)
    test_images = _resize(test.images, conf.img_size, conf.interpolation).to(store)
    train_labels, test_labels = train.labels.to(store), test.labels.to(store)
    common = dict(device=device, mean=list(conf.mean), std=list(conf.std), rank=rank, world_size=world_size)
    return Data(
        train=TensorLoader(train_images, train_labels, train_idx, batch_size=conf.batch_size, train=True,
                           seed=seed, crop_padding=conf.crop_padding, hflip=conf.hflip, split="train",
                           **common),
        val=TensorLoader(train_images, train_labels, val_idx, batch_size=conf.eval_batch_size, train=False,
                         split="train", **common),
        test=TensorLoader(test_images, test_labels, test_idx, batch_size=conf.eval_batch_size, train=False,
                          split="test", **common),
        num_classes=conf.num_classes, in_chans=conf.in_chans, img_size=conf.img_size,
        train_size=len(train_idx), val_size=len(val_idx), test_size=len(test_idx),
        classes=list(train.classes))


def _build_tensor_set(load: Callable, conf: DataConf, device: torch.device, seed: int, rank: int,
                      world_size: int) -> Data:
    root = to_absolute_path(conf.root)
    train, test = load(root, conf.download)
    return _tensor_data(conf, train, test, f"{conf.name} in {root}", device, seed, rank, world_size)


def _build_folder(conf: DataConf, device: torch.device, seed: int, rank: int, world_size: int) -> Data:
    root = to_absolute_path(conf.root)
    train_set, test_set = scan_folder(root, "train"), scan_folder(root, "val")
    if test_set.classes != train_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))[:5]
        only_val = sorted(set(test_set.classes) - set(train_set.classes))[:5]
        raise DataError(f"{root}/train and {root}/val have different class folders (only in train: "
                        f"{only_train}, only in val: {only_val}); data.root must hold the same "
                        f"<class> folders in train/ and val/.")
    _check_channels(conf, 3)  # the folder loader decodes every image to RGB
    labels = torch.tensor(train_set.targets, dtype=torch.int64)
    _check_classes(conf, labels, train_set.classes, f"{root}/train")  # before decoding anything
    if conf.in_memory:  # a small folder data set: decode once, then the same path as CIFAR
        train = decode_folder(train_set.samples, train_set.classes, conf.img_size, conf.interpolation,
                              conf.num_workers)
        test = decode_folder(test_set.samples, test_set.classes, conf.img_size, conf.interpolation,
                             conf.num_workers)
        return _tensor_data(conf, train, test, f"{root}/train", device, seed, rank, world_size)

    train_idx, val_idx = stratified_split(labels, conf.num_classes, conf.val_size, conf.train_subset)
    test_idx = _test_indices(conf, torch.tensor(test_set.targets, dtype=torch.int64))
    _check_batches(conf, len(train_idx), world_size)
    train_tf, eval_tf = folder_transforms(conf)
    common = dict(device=device, num_workers=conf.num_workers, rank=rank, world_size=world_size)
    return Data(
        train=FolderLoader(FolderSplit(train_set.samples, train_tf), train_idx, batch_size=conf.batch_size,
                           train=True, seed=seed, split="train", **common),
        val=FolderLoader(FolderSplit(train_set.samples, eval_tf), val_idx, batch_size=conf.eval_batch_size,
                         train=False, split="train", **common),
        test=FolderLoader(FolderSplit(test_set.samples, eval_tf), test_idx,
                          batch_size=conf.eval_batch_size, train=False, split="test", **common),
        num_classes=conf.num_classes, in_chans=conf.in_chans, img_size=conf.img_size,
        train_size=len(train_idx), val_size=len(val_idx), test_size=len(test_idx),
        classes=list(train_set.classes))


def _dense_data(conf: DataConf, read, train_split: str, test_split: str, root: Path, device: torch.device,
                seed: int, rank: int, world_size: int) -> Data:
    """Detection or segmentation data of a COCO- or ADE20K-format folder (ablate/data/dense.py)."""
    train = read(root, train_split, conf.in_chans, conf.img_size, conf.num_classes)
    test = read(root, test_split, conf.in_chans, conf.img_size, conf.num_classes)
    train_idx, val_idx = carve(len(train), conf.val_size, conf.train_subset)
    test_idx = torch.arange(len(test))
    if conf.test_subset is not None:
        if not 1 <= conf.test_subset <= len(test):
            raise DataError(f"data.test_subset={conf.test_subset} does not fit the {len(test)} images of "
                            f"{test_split}: set it between 1 and {len(test)}, or null for all of them.")
        test_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(SPLIT_SEED))
        test_idx = test_idx[:conf.test_subset].sort().values
    _check_batches(conf, len(train_idx), world_size)
    common = dict(device=device, mean=list(conf.mean), std=list(conf.std), in_memory=conf.in_memory,
                  num_workers=conf.num_workers, rank=rank, world_size=world_size)
    loaders = dict(
        train=DenseLoader(train, train_idx, batch_size=conf.batch_size, train=True, seed=seed,
                          hflip=conf.hflip, name=train_split, **common),
        val=DenseLoader(train, val_idx, batch_size=conf.eval_batch_size, train=False, name=train_split,
                        **common),
        test=DenseLoader(test, test_idx, batch_size=conf.eval_batch_size, train=False, name=test_split,
                         **common))
    for loader in loaders.values():  # in-memory sets decoded here: a damaged file fails before the run
        loader.preload()
    return Data(
        **loaders,
        num_classes=conf.num_classes, in_chans=conf.in_chans, img_size=conf.img_size,
        train_size=len(train_idx), val_size=len(val_idx), test_size=len(test_idx),
        classes=[c["name"] for c in train.coco.loadCats(train.category_ids)] if isinstance(train, CocoSplit)
        else [])


def _build_coco(conf: DataConf, device, seed, rank, world_size, root: Path | None = None) -> Data:
    root = Path(to_absolute_path(conf.root)) if root is None else root
    return _dense_data(conf, coco_split, "train2017", "val2017", root, device, seed, rank, world_size)


def _build_ade20k(conf: DataConf, device, seed, rank, world_size, root: Path | None = None) -> Data:
    root = Path(to_absolute_path(conf.root)) if root is None else root
    return _dense_data(conf, ade_split, "training", "validation", root, device, seed, rank, world_size)


def _build_garment_scenes(build, form: str, conf: DataConf, device, seed, rank, world_size) -> Data:
    """The garment scenes (ablate/data/scenes.py) under <data.root>/scenes, written on first use from
    the Fashion-MNIST files under data.root."""
    from ablate.data.scenes import ensure_scenes  # here: `python -m ablate.data.scenes` imports this package

    root = Path(to_absolute_path(conf.root))
    ensure_scenes(root / "scenes", root)
    return build(conf, device, seed, rank, world_size, root=root / "scenes" / form)


# data.name -> builder(conf, device, seed, rank, world_size)
BUILDERS: dict[str, Callable[[DataConf, torch.device, int, int, int], Data]] = {
    **{name: functools.partial(_build_tensor_set, load) for name, load in TENSOR_SOURCES.items()},
    "imagenet": _build_folder,
    "imagefolder": _build_folder,  # any other data set in the ImageNet layout
    # detection (COCO format) and semantic segmentation (ADE20K format)
    "coco": _build_coco,
    "ade20k": _build_ade20k,
    "garment_scenes_coco": functools.partial(_build_garment_scenes, _build_coco, "coco"),
    "garment_scenes_ade20k": functools.partial(_build_garment_scenes, _build_ade20k, "ade20k"),
}
