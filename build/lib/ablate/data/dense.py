"""Detection and segmentation data: COCO-format and ADE20K-format folders as loaders of fixed-size batches.

    COCO format     <root>/train2017/*, <root>/val2017/*, <root>/annotations/instances_{train,val}2017.json
                    (torchvision's CocoDetection reads them; masks from polygons or RLE by pycocotools)
    ADE20K format   <root>/images/{training,validation}/*, <root>/annotations/{training,validation}/*.png
                    (label 0 is "other", ignored; class k is stored as k + 1, as ADE20K does; 255 is
                    ignored too, the ignore index of label maps already shifted, as mmsegmentation's)

An annotation file is checked whole before it is used (every key the loaders and COCOeval read, every
image file it names), so a malformed one fails before training with the key, value or file to change.

ablate's backbones are built for one input size (their windows, masks and position tables are laid
out for it), so every image is letterboxed to `data.img_size` square: resized so that its longer
side fits, then padded right and below (image with 0, label map with the ignore label, masks with 0).
Boxes (clipped to the image) and masks are scaled with it, masks and label maps each pixel from the
source pixel nearest by centre, as the resized image's pixels are (PyTorch's 'nearest' would take the
one up and left of it, shifting them against the image). Each target keeps its `scale` and original
size, so the evaluation maps predictions back to the original image before scoring them.

As for classification, validation is carved from the training files (a fixed split seed, so every run
shares it) and the official validation files are the test split, the one the paper reports.
Training batches are shuffled and flipped from (seed, epoch) only. Small sets are decoded once and
held in memory; large ones are read per batch by `num_workers` processes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ablate.data.errors import UNREADABLE, DataError, Reported, raise_reported, unreadable
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


def _read_image(path: Path, channels: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return _to_tensor(image, channels)
    except UNREADABLE as err:
        raise unreadable(path, err) from err


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
        image = _read_image(path, self.channels)
        h, w = image.shape[-2:]
        if (h, w) != (info["height"], info["width"]):  # polygons are drawn at the file's height and width
            raise DataError(f"{path} is {h} x {w} pixels, but its annotations say {info['height']} x "
                            f"{info['width']} (image id {image_id}): correct height and width, or the file.")
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        # boxes over the image's edge clipped to it (a box outside it holds no pixel to learn from), then
        # those under a pixel wide or high left out, as before
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        kept = ((boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)).tolist()
        anns, boxes = [a for a, keep in zip(anns, kept) if keep], boxes[torch.tensor(kept, dtype=torch.bool)]
        image, scale = _letterbox(image, self.size)
        labels = torch.tensor([self.category_ids.index(a["category_id"]) + 1 for a in anns],
                              dtype=torch.int64)
        masks = torch.zeros((len(anns), self.size, self.size), dtype=torch.uint8)
        for k, a in enumerate(anns):
            mask = torch.from_numpy(self.coco.annToMask(a))[None]
            if mask.shape[-2:] != (h, w):  # an RLE carries its own size
                raise DataError(f"the mask of annotation id {a['id']} is {tuple(mask.shape[-2:])}, its image "
                                f"{path} {h} x {w}: correct its segmentation's size.")
            masks[k] = _letterbox(mask, self.size, mode="nearest-exact")[0][0]
        return image, {"boxes": (boxes * scale).float(), "labels": labels, "masks": masks,
                       "image_id": image_id, "scale": scale, "orig_size": (h, w)}


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
        dataset = json.loads(annotations.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DataError(f"{annotations} is not a COCO instances file ({type(err).__name__}: {err}).") from err
    problem = _coco_problem(dataset, images_dir)
    if problem:
        raise DataError(f"{annotations}: {problem}")
    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    categories = sorted(coco.cats)
    if len(categories) != num_classes:
        raise DataError(f"{annotations} has {len(categories)} categories but data.num_classes="
                        f"{num_classes}: set data.num_classes={len(categories)}.")
    return CocoSplit(images_dir, coco, sorted(coco.imgs), channels, size, categories)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _segmentation_problem(segmentation) -> str | None:
    """What is wrong with a COCO segmentation (polygons, or RLE with its size), or None."""
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
                and isinstance(counts, (str, list))):
            return None
    elif isinstance(segmentation, list) and segmentation and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
        return None  # polygons of three or more points (their numbers are not looked at one by one)
    return (f"segmentation {str(segmentation)[:60]} is neither a list of polygons [x1, y1, x2, y2, x3, y3, "
            "...] nor an RLE {'size': [height, width], 'counts': ...}")


def _coco_problem(dataset, images_dir: Path) -> str | None:
    """The first thing in a COCO instances file (parsed) that the loaders or COCOeval cannot use, saying
    what to change; None if there is none. Every image file it names must be in `images_dir`."""
    if not isinstance(dataset, dict):
        return ("is not a COCO instances file: its top level must be a JSON object with images, "
                "annotations and categories.")
    images, categories = dataset.get("images") or [], dataset.get("categories") or []
    annotations = dataset.get("annotations") or []  # none at all: images without objects
    if not all(isinstance(x, list) for x in (images, categories, annotations)):
        return "images, annotations and categories must each be a list."
    if not images:
        return "has no images: list them under images (id, file_name, height, width)."
    if not categories:
        return "has no categories: list them under categories (id, name)."
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            return f"category {str(c)[:80]} has no integer id."
    image_ids = set()
    for info in images:
        if not isinstance(info, dict):
            return f"image {str(info)[:80]} is not an object."
        for key, ok in (("id", isinstance(info.get("id"), int)),
                        ("file_name", isinstance(info.get("file_name"), str)),
                        ("height", isinstance(info.get("height"), int) and info["height"] > 0),
                        ("width", isinstance(info.get("width"), int) and info["width"] > 0)):
            if not ok:
                return (f"image {info.get('id', str(info)[:80])} has {key}={info.get(key)!r}: each image "
                        "needs an integer id, a file_name and its height and width in pixels (integers).")
        image_ids.add(info["id"])
    # the files, by one listing of the folder (a stat per image only for names in subfolders)
    listed = set(os.listdir(images_dir))
    missing = [i["file_name"] for i in images if i["file_name"] not in listed
               and not (images_dir / i["file_name"]).is_file()]
    if missing:
        return (f"{len(missing)} image file(s) it names are not in {images_dir} (e.g. "
                f"{', '.join(missing[:3])}): add them, or remove them and their annotations from the file.")
    category_ids = {c["id"] for c in categories}
    for a in annotations:
        if not isinstance(a, dict):
            return f"annotation {str(a)[:80]} is not an object."
        where = f"annotation id {a.get('id')!r} (image {a.get('image_id')!r})"
        for key in ("id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd"):
            if key not in a:  # area and iscrowd: COCOeval reads both
                return (f"{where} has no {key}: each annotation needs id, image_id, category_id, bbox, "
                        "segmentation, area and iscrowd.")
        if a["image_id"] not in image_ids:
            return f"{where} names image_id {a['image_id']!r}, which is not among its images."
        if a["category_id"] not in category_ids:
            return (f"{where} names category_id {a['category_id']!r}, which is not among its categories "
                    f"({', '.join(map(str, sorted(category_ids)))}).")
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box)) and min(box[2:]) >= 0):
            return (f"{where} has bbox {str(box)[:60]}: it must be [x, y, width, height], four numbers, "
                    "width and height not negative.")
        if not _number(a["area"]) or a["iscrowd"] not in (0, 1):
            return f"{where} has area {a['area']!r}, iscrowd {a['iscrowd']!r}: a number, and 0 or 1."
        problem = _segmentation_problem(a["segmentation"])
        if problem:
            return f"{where}: {problem}."
    return None


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
        image = _read_image(image_path, self.channels)
        try:
            with Image.open(label_path) as label_map:
                mode, array = label_map.mode, np.asarray(label_map)  # as stored: 16-bit maps not cut to 8
        except UNREADABLE as err:
            raise unreadable(label_path, err) from err
        if array.ndim != 2 or array.dtype.kind not in "iub":
            raise DataError(f"{label_path} is a {mode} image: a label map must be a single-channel PNG of "
                            "integer labels (mode L, P or I;16).")
        if array.shape != tuple(image.shape[-2:]):
            raise DataError(f"{label_path} is {array.shape[0]} x {array.shape[1]} pixels, its image "
                            f"{image_path} {image.shape[-2]} x {image.shape[-1]}: they must be the same "
                            "size.")
        stored = torch.from_numpy(array.astype(np.int64))
        # ADE20K: 0 is "other" (ignored), class k is stored as k + 1; 255 stays the ignore index
        ignored = (stored == 0) | (stored == IGNORE_LABEL)
        beyond = stored[~ignored & ((stored < 0) | (stored > self.num_classes))]
        if len(beyond):
            raise DataError(f"{label_path} holds label {int(beyond[0])}, outside data.num_classes="
                            f"{self.num_classes} classes (stored as 1..{self.num_classes}; 0 and 255 "
                            "ignored): set data.num_classes, or correct the label map.")
        labels = torch.where(ignored, IGNORE_LABEL, stored - 1)
        h, w = image.shape[-2:]
        image, scale = _letterbox(image, self.size)
        labels = _letterbox(labels[None], self.size, mode="nearest-exact", fill=IGNORE_LABEL)[0][0]
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

    def preload(self) -> None:
        """Decode now what an in-memory loader holds (a training loader all its samples, an evaluation
        loader this rank's share), so that a damaged file is bad input before the run starts (exit 2),
        not a failure in its first epoch."""
        if self.in_memory:
            for i in (self.indices if self.train else self.order()[0]):
                self._sample(int(i))

    def _sample(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.in_memory:
            return self.split[i]
        if i not in self._decoded:
            self._decoded[i] = self.split[i]
        return self._decoded[i]

    def _items(self, order: torch.Tensor):
        if self.in_memory or self.num_workers == 0:
            return (self._sample(int(i)) for i in order)
        return self._decoded_by_workers(order)

    def _decoded_by_workers(self, order: torch.Tensor):
        subset = torch.utils.data.Subset(Reported(self.split), order.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=None, num_workers=self.num_workers)
        return map(raise_reported, loader)

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
