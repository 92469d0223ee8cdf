"""Detection and segmentation data: COCO-format and ADE20K-format folders as loaders of fixed-size batches.

    COCO format     <root>/train2017/*, <root>/val2017/*, <root>/annotations/instances_{train,val}2017.json
                    (torchvision's CocoDetection reads them; masks from polygons or RLE by pycocotools)
    ADE20K format   <root>/images/{training,validation}/*, <root>/annotations/{training,validation}/*.png
                    (label 0 is "other", ignored; class k is stored as k + 1, as ADE20K does)

ablate's backbones are built for one input size (their windows, masks and position tables are laid
out for it), so every image is letterboxed to `data.img_size` square: resized so that its longer
side fits, then padded right and below (image with 0, label map with the ignore label, masks with 0).
Boxes and masks are scaled with it, and each target keeps its `scale` and original size, so the
evaluation maps predictions back to the original image before scoring them against the files.

As for classification, validation is carved from the training files (a fixed split seed, so every run
shares it) and the official validation files are the test split, the one the paper reports.
Training batches are shuffled and flipped from (seed, epoch) only. Small sets are decoded once and
held in memory; large ones are read per batch by `num_workers` processes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ablate.data.errors import DataError
from ablate.data.seeding import epoch_generator
from ablate.data.shards import EpochShards
from ablate.data.split import SPLIT_SEED

__all__ = ["IGNORE_LABEL", "CocoSplit", "AdeSplit", "DenseLoader", "letterbox_size", "coco_split",
           "ade_split", "carve"]

IGNORE_LABEL = 255  # ignored pixels of a label map, after ADE20K's 0 ("other") is moved here


def letterbox_size(height: int, width: int, size: int) -> tuple[float, int, int]:
    """(scale, new height, new width) of an image resized so that its longer side is `size`."""
    scale = size / max(height, width)
    return scale, max(1, round(height * scale)), max(1, round(width * scale))


def _to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def _letterbox(image: torch.Tensor, size: int, mode: str = "bilinear",
               fill: float = 0) -> tuple[torch.Tensor, float]:
    """(C, H, W) -> (C, size, size): resized (longer side = size) and padded right and below."""
    c, h, w = image.shape
    scale, nh, nw = letterbox_size(h, w, size)
    if (nh, nw) != (h, w):
        smooth = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        resized = F.interpolate(image[None].float(), size=(nh, nw), mode=mode, **smooth)[0]
        if image.dtype == torch.uint8 and mode == "bilinear":
            resized = resized.round().clamp(0, 255)
        image = resized.to(image.dtype)
    out = torch.full((c, size, size), fill, dtype=image.dtype)
    out[:, :nh, :nw] = image
    return out, scale


# -- COCO format -----------------------------------------------------------------------------------
@dataclass
class CocoSplit:
    """One COCO-format split: its images folder, its pycocotools COCO object, the image ids used."""

    images_dir: Path
    coco: Any  # pycocotools.coco.COCO
    image_ids: list[int]
    channels: int
    size: int
    category_ids: list[int] = field(default_factory=list)  # label k + 1 <-> category_ids[k]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(image uint8 (C, S, S), target): boxes float (K, 4) xyxy, labels int64 (K,) in 1..classes,
        masks uint8 (K, S, S), image_id, scale, orig_size (H, W); crowd regions left out."""
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            image = _to_tensor(Image.open(path), self.channels)
        except OSError as err:
            raise DataError(f"{path} cannot be read ({err}): replace it, or remove it from the "
                            "annotations.") from err
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)
                and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        image, scale = _letterbox(image, self.size)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        labels = torch.tensor([self.category_ids.index(a["category_id"]) + 1 for a in anns],
                              dtype=torch.int64)
        masks = torch.zeros((len(anns), self.size, self.size), dtype=torch.uint8)
        for k, a in enumerate(anns):
            mask = torch.from_numpy(self.coco.annToMask(a))[None]
            masks[k] = _letterbox(mask, self.size, mode="nearest")[0][0]
        return image, {"boxes": boxes * scale, "labels": labels, "masks": masks, "image_id": image_id,
                       "scale": scale, "orig_size": (h, w)}


def coco_split(root: Path, split: str, channels: int, size: int, num_classes: int) -> CocoSplit:
    """The COCO-format split `split` (train2017, val2017) of `root`; DataError naming what is missing."""
    from pycocotools.coco import COCO

    images_dir, annotations = root / split, root / "annotations" / f"instances_{split}.json"
    for needed in (images_dir, annotations):
        if not needed.exists():
            raise DataError(f"no {needed}: data.root={root} must hold a COCO-format data set ({split}/ "
                            f"with the images and annotations/instances_{split}.json). Set data.root to "
                            "the folder that holds them.")
    try:
        coco = _quiet(COCO, str(annotations))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise DataError(f"{annotations} is not a COCO instances file ({type(err).__name__}: {err}).") from err
    categories = sorted(coco.cats)
    if len(categories) != num_classes:
        raise DataError(f"{annotations} has {len(categories)} categories but data.num_classes="
                        f"{num_classes}: set data.num_classes={len(categories)}.")
    return CocoSplit(images_dir, coco, sorted(coco.imgs), channels, size, categories)


def _quiet(function, *args):
    """pycocotools prints its progress; a run's log is not the place."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


# -- ADE20K format ---------------------------------------------------------------------------------
@dataclass
class AdeSplit:
    """One ADE20K-format split: (image, label map) pairs of the same name."""

    pairs: list[tuple[Path, Path]]
    channels: int
    size: int
    num_classes: int

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(image uint8 (C, S, S), target): labels int64 (S, S) in 0..classes-1 or IGNORE_LABEL."""
        image_path, label_path = self.pairs[i]
        try:
            image = _to_tensor(Image.open(image_path), self.channels)
            stored = torch.from_numpy(np.asarray(Image.open(label_path), dtype=np.uint8).copy())
        except OSError as err:
            raise DataError(f"{image_path} or {label_path} cannot be read ({err}): replace it.") from err
        if stored.ndim != 2 or stored.shape != image.shape[-2:]:
            raise DataError(f"{label_path} is not a label map of {image_path}'s size "
                            f"{tuple(image.shape[-2:])}.")
        labels = stored.to(torch.int64) - 1  # ADE20K: 0 is "other" (ignored), class k is stored as k + 1
        labels[stored == 0] = IGNORE_LABEL
        if int(stored.max()) > self.num_classes:
            raise DataError(f"{label_path} holds label {int(stored.max())}, more than data.num_classes="
                            f"{self.num_classes} classes (stored as 1..{self.num_classes}).")
        h, w = image.shape[-2:]
        image, scale = _letterbox(image, self.size)
        labels = _letterbox(labels[None], self.size, mode="nearest", fill=IGNORE_LABEL)[0][0]
        return image, {"labels": labels, "scale": scale, "orig_size": (h, w), "image_id": i}


def ade_split(root: Path, split: str, channels: int, size: int, num_classes: int) -> AdeSplit:
    images_dir, labels_dir = root / "images" / split, root / "annotations" / split
    for needed in (images_dir, labels_dir):
        if not needed.is_dir():
            raise DataError(f"no {needed}: data.root={root} must hold an ADE20K-format data set "
                            f"(images/{split}/ and annotations/{split}/ with a label PNG per image). Set "
                            "data.root to the folder that holds them.")
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix == ".png"}
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    missing = [p.name for p in images if p.stem not in labels]
    if missing or not images:
        raise DataError(f"{labels_dir} has no label PNG for {missing[:3] or 'any image'} of {images_dir}: "
                        "every image needs one of the same name.")
    return AdeSplit([(p, labels[p.stem]) for p in images], channels, size, num_classes)


# -- batches ---------------------------------------------------------------------------------------
def _flip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror left-right inside the letterbox: the image's own width, not the padding, is mirrored."""
    size = image.shape[-1]
    scale, w = target["scale"], target["orig_size"][1]
    width = max(1, round(w * scale))
    image = image.clone()
    image[..., :width] = image[..., :width].flip(-1)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        masks = target["masks"].clone()
        masks[..., :width] = masks[..., :width].flip(-1)
        target["masks"] = masks
    else:
        labels = target["labels"].clone()
        labels[..., :width] = labels[..., :width].flip(-1)
        target["labels"] = labels
    assert image.shape[-1] == size
    return image, target


class DenseLoader(EpochShards):
    """Batches (images float32 normalized (B, C, S, S), targets list of dicts) on `device`.

    A training loader reshuffles and flips each epoch from (seed, epoch) only and drops the last
    incomplete batch; an eval loader keeps the order of `indices`. Under torchrun, rank r of
    `world_size` takes every world_size-th sample of the epoch's order. Small sets (`in_memory`) are
    decoded once at the first epoch; others are decoded per batch by `num_workers` processes.
    """

    def __init__(self, split, indices: torch.Tensor, *, batch_size: int, device: torch.device,
                 mean: list[float], std: list[float], train: bool, seed: int = 0, hflip: bool = False,
                 in_memory: bool = True, num_workers: int = 0, name: str = "train", rank: int = 0,
                 world_size: int = 1):
        self.split, self.indices = split, indices.to(torch.int64).cpu()
        self.batch_size, self.device, self.train, self.seed = batch_size, torch.device(device), train, seed
        self.hflip, self.in_memory, self.num_workers, self.name = hflip, in_memory, num_workers, name
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.epoch = 0
        self._decoded: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def order(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices this rank sees, whether each is flipped) in `epoch`."""
        n = len(self.indices)
        if not self.train:
            return self.indices[self.rank::self.world_size], torch.zeros(0, dtype=torch.bool)
        g = epoch_generator(self.seed, self.epoch if epoch is None else epoch)
        order = self.indices[torch.randperm(n, generator=g)]
        flips = torch.rand(n, generator=g) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return self.shard(order, flips)

    def _sample(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.in_memory:
            return self.split[i]
        if i not in self._decoded:
            self._decoded[i] = self.split[i]
        return self._decoded[i]

    def _items(self, order: torch.Tensor):
        if self.in_memory or self.num_workers == 0:
            return (self._sample(int(i)) for i in order)
        subset = torch.utils.data.Subset(self.split, order.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=None, num_workers=self.num_workers)
        return iter(loader)

    def __iter__(self):
        order, flips = self.order()
        batch: list[tuple[torch.Tensor, dict[str, Any]]] = []
        limit = len(self) * self.batch_size if self.train else len(order)
        for k, item in enumerate(self._items(order[:limit])):
            image, target = item
            if self.train and self.hflip and bool(flips[k]):
                image, target = _flip(image, target)
            batch.append((image, target))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch):
        images = torch.stack([image for image, _ in batch]).to(self.device, non_blocking=True)
        images = (images.float() / 255 - self.mean.to(self.device)) / self.std.to(self.device)
        targets = [{k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in t.items()} for _, t in batch]
        return images, targets

    def __repr__(self) -> str:
        return (f"DenseLoader({'train' if self.train else 'eval'}, split={self.name}, "
                f"samples={len(self.indices)}, batches={len(self)}, batch_size={self.batch_size}, "
                f"device={self.device})")


def carve(count: int, val_size: int, train_subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of `count` images: validation is a fixed random draw
    (SPLIT_SEED, as for classification), the training subset the next images of the same order."""
    if not 0 <= val_size < count:
        raise DataError(f"data.val_size={val_size} leaves no training image of {count}: set it below "
                        f"{count}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, rest = order[:val_size], order[val_size:]
    if train_subset is not None:
        if not 1 <= train_subset <= len(rest):
            raise DataError(f"data.train_subset={train_subset} does not fit: {len(rest)} training images "
                            f"are left after validation. Set it between 1 and {len(rest)}, or null for all.")
        rest = rest[:train_subset]
    return rest.sort().values, val.sort().values
