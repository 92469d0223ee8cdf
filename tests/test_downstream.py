"""The paper's other two tasks: the garment scenes, the COCO and ADE20K formats through their loaders,
the metrics against pycocotools and a hand count, and real detection and segmentation runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR
from ablate.data.dense import IGNORE_LABEL, ade_split, coco_split
from ablate.data.scenes import GARMENTS, IGNORE, SceneSpec, make_scenes, write_ade20k, write_coco
from ablate.data.sources import load_fashion_mnist
from ablate.tasks.metrics import coco_metrics, confusion, segmentation_metrics

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ABLATE_DATA", ROOT / "data"))
SMALL = SceneSpec(train=12, val=6)


@pytest.fixture(scope="module")
def garments():
    train, _ = load_fashion_mnist(str(DATA), download=False)
    return train.images[:2000], train.labels[:2000]


@pytest.fixture
def folders(tmp_path, garments):
    """A few scenes written as a COCO-format and an ADE20K-format folder, by the writers `make data`
    uses; train and validation splits as the real data sets name them."""
    coco, ade = tmp_path / "coco", tmp_path / "ade20k"
    splits = (("train2017", 0, 12, "training"), ("val2017", 1, 6, "validation"))
    for split, stream, count, ade_name in splits:
        scenes = make_scenes(*garments, count, SMALL, stream)
        write_coco(scenes, coco / split, coco / "annotations" / f"instances_{split}.json")
        write_ade20k(scenes, ade / "images" / ade_name, ade / "annotations" / ade_name)
    return coco, ade


# -- the scenes --------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_their_labels_agree(garments):
    first, again = make_scenes(*garments, 8, SMALL, 3), make_scenes(*garments, 8, SMALL, 3)
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and a.classes == b.classes
    for scene in first:
        assert 1 <= len(scene.boxes) <= SMALL.max_objects and len(scene.masks) == len(scene.classes)
        taken = np.zeros_like(scene.labels, dtype=bool)
        for (x0, y0, x1, y1), mask, cls in zip(scene.boxes, scene.masks, scene.classes):
            rows, cols = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert not (taken & mask).any()  # garments do not overlap
            taken |= mask
            assert (scene.labels[mask] == cls + 2).all()  # ADE20K: 0 ignored, 1 background, 2.. garments
        assert set(np.unique(scene.labels[~taken])) <= {1, IGNORE}


# -- the two formats through the loaders --------------------------------------------------------------
def test_the_coco_loader_reads_what_was_written(folders, garments):
    coco_root, _ = folders
    split = coco_split(coco_root, "train2017", channels=1, size=64, num_classes=10)
    scenes = make_scenes(*garments, 12, SMALL, 0)
    assert len(split) == 12 and [c["name"] for c in split.coco.loadCats(split.category_ids)] == list(GARMENTS)
    for i, scene in enumerate(scenes):
        image, target = split[i]
        assert torch.equal(image[0], torch.from_numpy(scene.image))
        assert target["boxes"].tolist() == [list(map(float, b)) for b in scene.boxes]
        assert target["labels"].tolist() == [c + 1 for c in scene.classes]
        assert torch.equal(target["masks"].bool(), torch.from_numpy(np.stack(scene.masks)))


def test_the_ade20k_loader_moves_other_to_the_ignore_label(folders, garments):
    _, ade_root = folders
    split = ade_split(ade_root, "training", channels=1, size=64, num_classes=11)
    scene = make_scenes(*garments, 1, SMALL, 0)[0]
    _, target = split[0]
    stored = torch.from_numpy(scene.labels.astype(np.int64))
    other = stored == IGNORE
    assert (target["labels"][other] == IGNORE_LABEL).all()
    assert torch.equal(target["labels"][~other], stored[~other] - 1)


def test_letterboxing_keeps_boxes_masks_and_labels_with_the_image(tmp_path, garments):
    """A 40 x 64 image at input size 32: scaled by 1/2, padded below; boxes, masks and labels too."""
    scene = make_scenes(*garments, 1, SceneSpec(canvas=64, max_side=30, train=1, val=1), 5)[0]
    crop = 40
    scene.image, scene.labels = scene.image[:crop], scene.labels[:crop]
    keep = [i for i, (_, y0, _, y1) in enumerate(scene.boxes) if y1 <= crop]
    scene.boxes = [scene.boxes[i] for i in keep]
    scene.masks = [scene.masks[i][:crop] for i in keep]
    scene.classes = [scene.classes[i] for i in keep]
    coco, ade = tmp_path / "coco", tmp_path / "ade"
    write_coco([scene], coco / "val2017", coco / "annotations" / "instances_val2017.json")
    image, target = coco_split(coco, "val2017", 1, 32, 10)[0]
    assert image.shape == (1, 32, 32) and target["scale"] == 0.5 and target["orig_size"] == (40, 64)
    assert (image[:, 20:] == 0).all()  # the padding below the 20 scaled rows
    assert target["boxes"].tolist() == [[b * 0.5 for b in box] for box in scene.boxes]
    write_ade20k([scene], ade / "images" / "validation", ade / "annotations" / "validation")
    _, seg = ade_split(ade, "validation", 1, 32, 11)[0]
    assert (seg["labels"][20:] == IGNORE_LABEL).all()


# -- the metrics ------------------------------------------------------------------------------------
def _rle(box: tuple[int, int, int, int], size: int = 64) -> dict:
    from pycocotools import mask as coco_mask

    mask = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return {"size": [size, size], "counts": coco_mask.encode(np.asfortranarray(mask))["counts"].decode()}


def _ground_truth(boxes: list[tuple[int, int, int, int]]):
    from pycocotools.coco import COCO

    coco = COCO()
    images = [{"id": i + 1, "height": 64, "width": 64, "file_name": f"{i}.png"} for i in range(len(boxes))]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": _rle(box)}
                   for i, box in enumerate(boxes) for x0, y0, x1, y1 in [box]]
    categories = [{"id": 1, "name": "garment"}]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco


def _result(image_id: int, box, score: float) -> dict:
    x0, y0, x1, y1 = box
    return {"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
            "segmentation": _rle(box)}


def test_perfect_predictions_score_100_on_every_ap(folders):
    coco_root, _ = folders
    split = coco_split(coco_root, "val2017", channels=1, size=64, num_classes=10)
    perfect = [{**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 1.0}
               for a in split.coco.dataset["annotations"]]
    assert coco_metrics(split.coco, split.image_ids, perfect) == pytest.approx(
        dict.fromkeys(("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"), 100.0))
    assert all(v == 0 for v in coco_metrics(split.coco, split.image_ids, []).values())


def test_ap_equals_a_hand_count():
    """Two images, one object each. The first found exactly (score 0.9), the second by a box shifted
    4 px (IoU 320/480 = 0.667, score 0.8). At IoU thresholds up to 0.65 both are found: precision 1
    at every recall, AP 100. Above, the second is a false positive: precision 1 up to recall 0.5 and
    none beyond, which COCO's 101-point interpolation counts as 51/101. Boxes and rectangular masks
    alike."""
    coco = _ground_truth([(10, 10, 30, 30), (20, 20, 40, 40)])
    found = [_result(1, (10, 10, 30, 30), 0.9), _result(2, (24, 20, 44, 40), 0.8)]
    half = 100 * 51 / 101
    expected = {"ap": (4 * 100 + 6 * half) / 10, "ap50": 100.0, "ap75": half}
    got = coco_metrics(coco, [1, 2], found)
    for kind in ("box", "mask"):
        for key, value in expected.items():
            assert got[f"{kind}_{key}"] == pytest.approx(value, abs=1e-6), (kind, key)


def test_miou_and_pixel_accuracy_equal_a_hand_count():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_LABEL, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    # class 0: hit 1, labels 2, preds 2 -> 1/3; class 1: hit 3, labels 3, preds 4 -> 3/4;
    # class 2: hit 1, labels 2, preds 1 (the ignored pixel's 2 does not count) -> 1/2; class 3: absent
    got = segmentation_metrics(confusion(preds, labels, 4, IGNORE_LABEL))
    assert got["miou"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert got["pixel_acc"] == pytest.approx(100 * 5 / 7)
    from torchmetrics.functional.classification import multiclass_jaccard_index

    three = multiclass_jaccard_index(preds, labels, 3, ignore_index=IGNORE_LABEL, average="macro")
    assert got["miou"] == pytest.approx(100 * float(three))  # torchmetrics agrees: every class is present


# -- real runs through the command's loop ----------------------------------------------------------
def _config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("downstream", overrides=[
            "task.pretrained=false", "schedule.epochs=1", "data.val_size=2", "data.batch_size=4",
            "data.eval_batch_size=4", "logger=none", "trainer.quiet=true", "trainer.threads=1",
            f"trainer.results_root={tmp_path / 'results'}", *overrides])


@pytest.mark.parametrize("task,data,metric", [("detection", "coco", "box_ap"),
                                              ("segmentation", "ade20k", "miou")])
def test_a_coco_and_an_ade20k_folder_train_and_evaluate(folders, tmp_path, task, data, metric):
    from ablate.training import train

    root = folders[0] if data == "coco" else folders[1]
    classes = 10 if data == "coco" else 11
    cfg = _config(tmp_path, f"task={task}", f"data={data}", f"data.root={root}", "data.img_size=64",
                  "data.in_chans=1", f"data.num_classes={classes}", "data.in_memory=true",
                  "data.num_workers=0", "data.mean=[0.286]", "data.std=[0.353]")
    results = train(cfg)
    assert results["status"] == "completed", results.get("error")
    assert results["task"] == task and results["pretrained_experiment"] == "scratch"
    assert results["test_size"] == 6 and results["train_size"] == 10
    assert 0 <= results[f"final_test_{metric}"] <= 100 and results["gmac"] > 0
    metrics = next((tmp_path / "results").rglob("metrics.jsonl")).read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert f"val_{metric}" in rows[0] and f"test_{metric}" in rows[0]


def test_missing_coco_data_exits_2_naming_the_folder_after_building_the_paper_size_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ablate.downstream", "data=coco", f"data.root={tmp_path / 'nowhere'}",
         "model=tiny", f"trainer.results_root={tmp_path}", "logger=none", "trainer.threads=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{tmp_path / 'nowhere'}" in done.stderr and "COCO-format" in done.stderr
