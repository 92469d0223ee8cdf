"""Garment scenes: the embedded detection and segmentation data, written as COCO and ADE20K folders.

No package ships COCO or ADE20K, and the paper's other two tasks need objects to find and pixels to
label. A scene places a few real Fashion-MNIST garments (1 to `max_objects`, each resized to a side
of `min_side` to `max_side` pixels, not overlapping) on a canvas of faint noise; every garment's
silhouette (its pixels above `threshold`, holes filled) is its instance mask, its Fashion-MNIST
label its class. The same scenes are written twice, in the two formats the field uses, so the
default runs go through the same loaders as the real data sets:

    <root>/coco/train2017/*.png, val2017/*.png, annotations/instances_{train,val}2017.json
        boxes [x, y, w, h], areas, masks as COCO RLE, categories 1..10 (the garment names)
    <root>/ade20k/images/{training,validation}/*.png, annotations/{training,validation}/*.png
        label PNGs as ADE20K's: 0 = ignored ("other"), then the classes from 1: 1 background,
        2..11 the garments; a garment's rim (pixels between `rim` and `threshold`) is 0, ignored

Training scenes take their garments from Fashion-MNIST's training files (which the classification
runs that pretrain the backbones learn from), validation scenes from its test files. Generation is
deterministic (one seed); `<root>/scenes.json` records the settings and the sha256 of the annotation
files, and `ensure_scenes` writes the folders only when that record is missing or says otherwise.

    python -m ablate.data.scenes data/scenes           # what `make data` runs
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ablate.data.errors import DataError
from ablate.data.sources import load_fashion_mnist

log = logging.getLogger("ablate.data")

__all__ = ["SceneSpec", "Scene", "make_scene", "make_scenes", "write_coco", "write_ade20k",
           "ensure_scenes", "GARMENTS", "IGNORE"]

GARMENTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Ankle boot")
IGNORE = 0  # ADE20K's "other" label, ignored by training and metrics


@dataclass(frozen=True)
class SceneSpec:
    """What the generator draws; part of scenes.json, so another spec writes the folders again."""

    canvas: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_side: int = 16
    max_side: int = 40
    train: int = 4000
    val: int = 500
    threshold: float = 0.15  # of the garment's intensity: silhouette
    rim: float = 0.04  # below the threshold but above this: the ambiguous rim, ignored in ADE labels
    noise: float = 10.0  # std of the background's noise, in grey levels
    seed: int = 0
    version: int = 1  # of this generator: a change of how scenes are drawn bumps it


@dataclass
class Scene:
    """One canvas: image uint8 (H, W), per object its box [x0, y0, x1, y1) in pixels, mask (H, W) bool,
    class (0..9); `labels` uint8 (H, W) in ADE20K's convention."""

    image: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    masks: list[np.ndarray]
    classes: list[int]
    labels: np.ndarray


def _place(rng: np.random.Generator, sides: list[int], canvas: int, tries: int = 50):
    """Top-left corners for squares of `sides` that do not overlap (a 1-pixel gap), or None."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(tries):
            y, x = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
            if all(y + side + 1 <= py or py + ps + 1 <= y or x + side + 1 <= px or px + ps + 1 <= x
                   for py, px, ps in placed):
                placed.append((y, x, side))
                break
        else:
            return None
    return placed


def make_scene(rng: np.random.Generator, garments: torch.Tensor, labels: torch.Tensor,
               spec: SceneSpec) -> Scene:
    """One scene from the garments (uint8 (N, 1, 28, 28)) and their labels."""
    c = spec.canvas
    while True:  # the sizes are redrawn in the rare case they do not fit together
        count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        sides = sorted((int(s) for s in rng.integers(spec.min_side, spec.max_side + 1, size=count)),
                       reverse=True)
        placed = _place(rng, sides, c)
        if placed is not None:
            break
    image = np.clip(rng.normal(0.0, spec.noise, size=(c, c)), 0, 255)
    ade = np.ones((c, c), dtype=np.uint8)  # 1: background
    boxes, masks, classes = [], [], []
    for y, x, side in placed:
        index = int(rng.integers(0, len(garments)))
        garment = F.interpolate(garments[index:index + 1].float(), size=(side, side), mode="bilinear",
                                antialias=True, align_corners=False)[0, 0].numpy()
        alpha = garment / 255.0
        silhouette = ndimage.binary_fill_holes(alpha > spec.threshold)
        if not silhouette.any():  # a garment too faint at this size: leave the place empty
            continue
        mask = np.zeros((c, c), dtype=bool)
        mask[y:y + side, x:x + side] = silhouette
        window = image[y:y + side, x:x + side]
        window[silhouette] = np.maximum(garment[silhouette], window[silhouette])
        rim = np.zeros((c, c), dtype=bool)
        rim[y:y + side, x:x + side] = (alpha > spec.rim) & ~silhouette
        cls = int(labels[index])
        ade[mask] = cls + 2
        ade[rim] = IGNORE
        rows, cols = np.nonzero(mask)
        boxes.append((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
        masks.append(mask)
        classes.append(cls)
    return Scene(np.round(image).astype(np.uint8), boxes, masks, classes, ade)


def make_scenes(garments: torch.Tensor, labels: torch.Tensor, count: int, spec: SceneSpec,
                stream: int) -> list[Scene]:
    """`count` scenes, the same for the same (spec, stream) on any machine."""
    rng = np.random.default_rng([spec.seed, stream])
    return [make_scene(rng, garments, labels, spec) for _ in range(count)]


def _file_name(i: int) -> str:
    return f"{i + 1:012d}.png"


def write_coco(scenes: list[Scene], images_dir: Path, annotation_file: Path) -> None:
    """The scenes as a COCO instances folder (images, and one JSON with RLE masks)."""
    from pycocotools import mask as coco_mask

    images_dir.mkdir(parents=True, exist_ok=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(images_dir / _file_name(i))
        h, w = scene.image.shape
        images.append({"id": i + 1, "file_name": _file_name(i), "height": h, "width": w})
        for box, mask, cls in zip(scene.boxes, scene.masks, scene.classes):
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    categories = [{"id": k + 1, "name": name, "supercategory": "garment"}
                  for k, name in enumerate(GARMENTS)]
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                           "categories": categories}))


def write_ade20k(scenes: list[Scene], images_dir: Path, labels_dir: Path) -> None:
    """The scenes as an ADE20K folder: images and label PNGs of the same names."""
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(images_dir / _file_name(i))
        Image.fromarray(scene.labels).save(labels_dir / _file_name(i))


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def _record(root: Path) -> dict | None:
    try:
        return json.loads((root / "scenes.json").read_text())
    except (OSError, ValueError):
        return None


def _ready(root: Path, spec: SceneSpec, annotations: list[Path]) -> bool:
    record = _record(root)
    return (record is not None and record.get("spec") == asdict(spec) and all(p.exists() for p in annotations)
            and record.get("annotations_sha256") == _digest(annotations))


@contextlib.contextmanager
def _one_writer(root: Path) -> Iterator[None]:
    """Held while the scenes are written: the jobs of a parallel sweep on a fresh data folder all find
    them missing at once, and a job that had written them read images that another was rewriting
    (cut short: a damaged image, the job failed). The others wait, then find the writer's record.
    A flock: released when its holder ends, even killed."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_scenes(root: str | Path, fmnist_root: str | Path, spec: SceneSpec = SceneSpec()) -> Path:
    """Write the scenes under `root` unless scenes.json says they are there, of this spec; returns root.
    The record is written last, so a folder cut short by a crash is written again; one process
    writes at a time."""
    root = Path(root)
    coco, ade = root / "coco", root / "ade20k"
    annotations = [coco / "annotations" / f"instances_{split}.json" for split in ("train2017", "val2017")]
    if _ready(root, spec, annotations):  # without the lock: a read-only copy of the scenes is read as is
        return root
    log.info("the garment scenes are missing from %s: writing them, once (%d training and %d validation "
             "canvases; about 40 s on 2 cores, or waiting for the job already writing them)",
             root, spec.train, spec.val)
    with _one_writer(root):
        if not _ready(root, spec, annotations):  # not written by another job meanwhile
            _write_scenes(root, fmnist_root, spec, coco, ade, annotations)
    return root


def _write_scenes(root: Path, fmnist_root: str | Path, spec: SceneSpec, coco: Path, ade: Path,
                  annotations: list[Path]) -> None:
    try:
        train, test = load_fashion_mnist(str(fmnist_root), download=True)
    except DataError as err:
        raise DataError(f"the garment scenes are made from Fashion-MNIST, which is missing: {err}") from err
    root.mkdir(parents=True, exist_ok=True)
    (root / "scenes.json").unlink(missing_ok=True)
    for split, source, count, stream, ade_split in (("train2017", train, spec.train, 0, "training"),
                                                     ("val2017", test, spec.val, 1, "validation")):
        scenes = make_scenes(source.images, source.labels, count, spec, stream)
        write_coco(scenes, coco / split, coco / "annotations" / f"instances_{split}.json")
        write_ade20k(scenes, ade / "images" / ade_split, ade / "annotations" / ade_split)
    (root / "scenes.json").write_text(json.dumps({"spec": asdict(spec), "classes": list(GARMENTS),
                                                  "annotations_sha256": _digest(annotations)}, indent=1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "data/scenes")
    fmnist = Path(argv[1]) if len(argv) > 1 else root.parent
    ensure_scenes(root, fmnist)
    record = _record(root)
    spec = record["spec"]
    print(f"garment scenes ready in {root}: {spec['train']} training and {spec['val']} validation scenes "
          f"of {spec['canvas']} px, in COCO ({root / 'coco'}) and ADE20K ({root / 'ade20k'}) format")
    return 0


if __name__ == "__main__":
    sys.exit(main())
