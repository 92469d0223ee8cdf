"""The paper's other two tasks: the garment scenes, the COCO and ADE20K formats through their loaders,
the metrics against pycocotools and a hand count, and real detection and segmentation runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

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



def test_writing_the_scenes_says_so_first(tmp_path, caplog):
    """Writing the scenes takes about 40 s on 2 cores, before a run's first line: it says so as it
    starts (it printed nothing), and says nothing when they are there."""
    from ablate.data.scenes import ensure_scenes

    with caplog.at_level("INFO", logger="ablate.data"):
        ensure_scenes(tmp_path, DATA, SMALL)
    assert f"the garment scenes are missing from {tmp_path}: writing them, once" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="ablate.data"):
        ensure_scenes(tmp_path, DATA, SMALL)
    assert caplog.text == ""


def test_jobs_preparing_the_scenes_at_once_write_them_once(tmp_path, monkeypatch):
    """The jobs of a parallel sweep on a fresh data folder all found the scenes missing and wrote the
    same files at once: the first job done read images that another was still rewriting (cut short:
    a damaged image, that job failed). One job writes them; the others wait, then find its record."""
    import threading

    import ablate.data.scenes as scenes

    writes, checked, others = [], threading.Event(), []
    write, record = scenes.write_coco, scenes._record

    def record_seen(root):
        if threading.current_thread() is not threading.main_thread():
            checked.set()  # the second job has looked for the scenes' record
        return record(root)

    def writing(batch, images_dir, annotation_file):
        writes.append(images_dir.name)
        if not others:  # the first job is writing: a second job starts now, and looks
            others.append(threading.Thread(target=scenes.ensure_scenes, args=(tmp_path, DATA, SMALL)))
            others[0].start()
            assert checked.wait(timeout=120)
        write(batch, images_dir, annotation_file)

    monkeypatch.setattr(scenes, "_record", record_seen)
    monkeypatch.setattr(scenes, "write_coco", writing)
    scenes.ensure_scenes(tmp_path, DATA, SMALL)
    others[0].join(timeout=300)
    assert writes == ["train2017", "val2017"]  # written once, by the first job
    assert scenes._ready(tmp_path, SMALL, [tmp_path / "coco" / "annotations" / f"instances_{split}.json"
                                           for split in ("train2017", "val2017")])

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


# -- hostile input: refused up front with the key, file or value to change; unusual input works --------
def _edit_annotations(coco: Path, split: str, edit) -> Path:
    path = coco / "annotations" / f"instances_{split}.json"
    dataset = json.loads(path.read_text())
    if edit is None:  # not an object at all
        dataset = []
    else:
        edit(dataset)
    path.write_text(json.dumps(dataset))
    return path


def _first(key: str):
    def edit(dataset):
        del dataset["annotations"][0][key]
    return edit


def _set(key: str, value):
    def edit(dataset):
        dataset["annotations"][0][key] = value
    return edit


@pytest.mark.parametrize("edit, expect", [
    (_first("bbox"), "bbox"),
    (_first("segmentation"), "segmentation"),
    (_first("area"), "area"),  # COCOeval reads it (its area ranges)
    (_first("iscrowd"), "iscrowd"),  # COCOeval reads it
    (_set("bbox", [1, 2, 3]), "bbox"),
    (_set("bbox", "1 2 3 4"), "bbox"),
    (_set("bbox", [1, 2, -5, 4]), "bbox"),
    (_set("segmentation", [[1, 2]]), "segmentation"),
    (_set("segmentation", "a mask"), "segmentation"),
    (_set("category_id", 99), "category_id 99"),
    (_set("image_id", 999), "image_id 999"),
    (lambda d: d["images"][0].pop("file_name"), "file_name"),
    (lambda d: d["images"][0].update(height="64"), "height"),
    (None, "a JSON object"),
    (lambda d: d.update(images=[], annotations=[]), "no images"),
    (lambda d: d.pop("categories"), "no categories"),
], ids=["no bbox", "no segmentation", "no area", "no iscrowd", "short bbox", "text bbox", "negative width",
        "short polygon", "text segmentation", "unknown category", "unknown image", "no file_name",
        "text height", "a list", "no images", "no categories"])
def test_a_malformed_coco_annotation_file_is_refused_naming_what_to_change(folders, edit, expect):
    from ablate.data import DataError

    path = _edit_annotations(folders[0], "val2017", edit)
    with pytest.raises(DataError) as caught:
        coco_split(folders[0], "val2017", channels=1, size=64, num_classes=10)
    assert str(path) in str(caught.value) and expect in str(caught.value), caught.value


def test_an_image_file_the_annotations_name_must_exist(folders):
    from ablate.data import DataError

    missing = folders[0] / "val2017" / "000000000003.png"
    missing.unlink()
    with pytest.raises(DataError, match="000000000003.png"):
        coco_split(folders[0], "val2017", channels=1, size=64, num_classes=10)


def test_boxes_are_clipped_to_the_image_and_those_outside_it_dropped(folders):
    def edit(dataset):
        first, second = [a for a in dataset["annotations"] if a["image_id"] == 1][:2]
        first["bbox"] = [-4.0, 50.0, 20.0, 30.0]  # over the left and bottom edges of the 64 x 64 image
        second["bbox"] = [70.0, 10.0, 5.0, 5.0]  # wholly right of it
    _edit_annotations(folders[0], "val2017", edit)
    split = coco_split(folders[0], "val2017", channels=1, size=32, num_classes=10)
    _, target = split[0]
    assert target["boxes"][0].tolist() == [0.0, 25.0, 8.0, 32.0]  # [0, 50, 16, 64] at scale 1/2
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
    assert (target["boxes"] >= 0).all() and (target["boxes"] <= 32).all()
    assert (target["boxes"][:, 2:] - target["boxes"][:, :2] >= 0.5).all()  # nothing degenerate left


def _damage_png(path: Path) -> None:
    """A chunk length overwritten: PIL raises SyntaxError ("broken PNG file"), not OSError."""
    data = bytearray(path.read_bytes())
    data[35] = 0
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("task,data", [("detection", "coco"), ("segmentation", "ade20k")])
def test_a_damaged_image_exits_2_naming_it_before_the_run_starts(folders, tmp_path, task, data):
    root = folders[0] if data == "coco" else folders[1]
    damaged = (root / "train2017" if data == "coco" else root / "images" / "training") / "000000000005.png"
    _damage_png(damaged)
    classes = 10 if data == "coco" else 11
    done = _command("ablate.downstream", f"task={task}", f"data={data}", f"data.root={root}",
                    "data.img_size=64", "data.in_chans=1", f"data.num_classes={classes}",
                    "data.in_memory=true", "data.num_workers=0", "data.mean=[0.286]", "data.std=[0.353]",
                    "data.val_size=2", "data.batch_size=4", "task.pretrained=false", root=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(damaged) in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json"))


def test_an_error_in_a_loader_worker_is_its_message_without_the_worker_traceback(folders):
    from ablate.data import DataError
    from ablate.data.dense import DenseLoader

    damaged = folders[0] / "val2017" / "000000000002.png"
    _damage_png(damaged)
    split = coco_split(folders[0], "val2017", channels=1, size=64, num_classes=10)
    loader = DenseLoader(split, torch.arange(len(split)), batch_size=2, device="cpu", mean=[0.0], std=[1.0],
                         train=False, in_memory=False, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert str(damaged) in str(caught.value) and "Traceback" not in str(caught.value), caught.value


def test_ade20k_labels_255_are_ignored_and_16_bit_labels_are_read_as_they_are(folders):
    from PIL import Image

    from ablate.data import DataError

    labels = folders[1] / "annotations" / "training" / "000000000001.png"
    stored = np.asarray(Image.open(labels)).copy()
    stored[0, :5] = 255  # the ignore index of label maps already shifted (mmsegmentation's reduce_zero_label)
    Image.fromarray(stored).save(labels)
    _, target = ade_split(folders[1], "training", channels=1, size=64, num_classes=11)[0]
    assert (target["labels"][0, :5] == IGNORE_LABEL).all()
    wide = stored.astype(np.uint16)
    wide[0, 0] = 300  # 44 once cast to 8 bits: in range for 150 classes, wrong
    Image.fromarray(wide).save(labels)
    with pytest.raises(DataError, match="label 300"):
        ade_split(folders[1], "training", channels=1, size=64, num_classes=150)[0]
    Image.fromarray(stored).convert("RGB").save(labels)
    with pytest.raises(DataError, match="single-channel"):
        ade_split(folders[1], "training", channels=1, size=64, num_classes=11)[0]


def test_letterboxed_masks_and_labels_stay_on_their_pixels_of_the_image(tmp_path):
    """Scaled by 100/64, an object's mask and label map cover the pixels its (bilinear) image does:
    each takes the source pixel nearest by centre (PyTorch's 'nearest' takes the one up and left,
    shifting masks and labels by up to a source pixel against the image)."""
    from ablate.data.scenes import Scene

    image = np.zeros((64, 64), dtype=np.uint8)
    image[11:37, 17:42] = 255
    inside = image > 0
    labels = np.where(inside, 2, 1).astype(np.uint8)
    scene = Scene(image, [(17, 11, 42, 37)], [inside], [0], labels)
    coco, ade = tmp_path / "coco", tmp_path / "ade"
    write_coco([scene], coco / "val2017", coco / "annotations" / "instances_val2017.json")
    write_ade20k([scene], ade / "images" / "validation", ade / "annotations" / "validation")
    letterboxed, target = coco_split(coco, "val2017", 1, 100, 10)[0]
    _, seg = ade_split(ade, "validation", 1, 100, 11)[0]
    inside, outside = letterboxed[0] > 160, letterboxed[0] < 96  # the object's edge, half covered, aside
    assert inside.sum() > 400 and (inside | outside).float().mean() > 0.95
    for covered in (target["masks"][0].bool(), seg["labels"] == 1):
        assert covered[inside].all() and not covered[outside].any()


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


def test_detections_map_back_to_the_image_and_stay_inside_it():
    """A 40 x 20 image letterboxed into 64 x 64 (scale 1.6, padding below 32): a box reaching into the
    padding is clipped to the image, boxes are scaled back, masks come back at the image's size."""
    from pycocotools import mask as coco_mask

    from ablate.tasks.dense import coco_results

    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 8:16, 8:24] = 1.0  # the image's rows 5-9, columns 5-14
    out = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 16.0], [-3.0, 20.0, 70.0, 60.0]]),
           "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.4]), "masks": masks}
    found = coco_results(out, {"orig_size": (20, 40), "image_id": 7}, 64, category_ids=[3, 5])
    assert [r["category_id"] for r in found] == [3, 5] and all(r["image_id"] == 7 for r in found)
    assert found[0]["bbox"] == pytest.approx([5.0, 5.0, 10.0, 5.0])
    assert found[1]["bbox"] == pytest.approx([0.0, 12.5, 40.0, 7.5])  # clipped at x 0 and 40, y 20
    decoded = coco_mask.decode(found[0]["segmentation"])
    assert decoded.shape == (20, 40) and decoded[5:10, 5:15].all() and decoded.sum() == 50


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


# on a GPU, as a user's run goes there: bf16 autocast and channels_last (trainer.precision=auto), the
# heads' box, ROI and mask operations on the GPU beside the backbone's fast paths
ON_A_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", ON_A_GPU])
@pytest.mark.parametrize("task,data,metric", [("detection", "coco", "box_ap"),
                                              ("segmentation", "ade20k", "miou")])
def test_a_coco_and_an_ade20k_folder_train_and_evaluate(folders, tmp_path, task, data, metric, device):
    from ablate.training import train

    root = folders[0] if data == "coco" else folders[1]
    classes = 10 if data == "coco" else 11
    cfg = _config(tmp_path, f"task={task}", f"data={data}", f"data.root={root}", "data.img_size=64",
                  "data.in_chans=1", f"data.num_classes={classes}", "data.in_memory=true",
                  "data.num_workers=0", "data.mean=[0.286]", "data.std=[0.353]", f"trainer.device={device}")
    results = train(cfg)
    assert results["status"] == "completed", results.get("error")
    assert results["device"].startswith(device)
    assert results["task"] == task and results["pretrained_experiment"] == "scratch"
    assert results["test_size"] == 6 and results["train_size"] == 10
    assert 0 <= results[f"final_test_{metric}"] <= 100 and results["gmac"] > 0
    metrics = next((tmp_path / "results").rglob("metrics.jsonl")).read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert f"val_{metric}" in rows[0] and f"test_{metric}" in rows[0]
    assert rows[0]["train_loss"] > 0 and rows[0]["samples_per_s"] > 0  # batches were trained on


def test_missing_coco_data_exits_2_naming_the_folder_after_building_the_paper_size_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ablate.downstream", "data=coco", f"data.root={tmp_path / 'nowhere'}",
         "model=tiny", f"trainer.results_root={tmp_path}", "logger=none", "trainer.threads=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{tmp_path / 'nowhere'}" in done.stderr and "COCO-format" in done.stderr


@pytest.mark.parametrize("flags, named", [
    (["--operator", "dwconvx"], "dwconvx"), (["--size", "huge"], "huge"), (["--input", "0", "64"], "--input"),
    (["--task", "segmentation", "--input", "17", "33"], "patch_size"), (["--classes", "0"], "--classes")])
def test_the_size_command_refuses_a_bad_flag_in_a_line_with_exit_2(flags, named):
    done = subprocess.run([sys.executable, "-m", "ablate.models.dense", "--size", "micro", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and named in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("head, role", [("upernet", "a layer after a global pooling"),
                                        ("dynamic_dwconv", "a dynamic weight predictor")])
def test_a_batch_of_one_names_the_batchnorm_that_needs_two_for_what_it_is(head, role):
    """UPerNet's 1x1 pyramid pooling normalises one value per channel per sample, like the dynamic
    predictors: one sample per step is refused, naming the layer as what it is."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import ablate
    from ablate.models.dense import UPerNet, head_settings
    from ablate.training import check_batchnorm_batch

    net = ablate.create("dwconv" if head == "upernet" else head, "micro", num_classes=0, img_size=32)
    model = UPerNet(net, 3, **head_settings("upernet", "micro", {})) if head == "upernet" else net
    cfg = OmegaConf.create({"data": {"batch_size": 1, "in_chans": 3, "img_size": 32},
                            "trainer": {"sync_bn": False}})
    with pytest.raises(ValueError, match=rf"data.batch_size=1 .*{role}.*Raise data.batch_size to 2"):
        check_batchnorm_batch(model, cfg, SimpleNamespace(enabled=False, world_size=1))


# -- the paper's protocol end to end: pretraining runs, a downstream sweep, the report -------------------
_PRETRAIN = ["data.train_subset=300", "data.val_size=100", "data.test_subset=100", "schedule.epochs=1"]
_QUIET = ["logger=none", "trainer.quiet=true", "trainer.threads=1"]


def _command(module: str, *overrides: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides, *_QUIET, f"trainer.results_root={root}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def _downstream_overrides(coco: Path) -> list[str]:
    """A COCO-format folder of a few scenes, fine-tuned from the classification runs `_PRETRAIN` makes."""
    return ["data=coco", f"data.root={coco}", "data.img_size=64", "data.in_chans=1", "data.num_classes=10",
            "data.in_memory=true", "data.num_workers=0", "data.mean=[0.286]", "data.std=[0.353]",
            "data.val_size=2", "data.batch_size=4", "data.eval_batch_size=4", "schedule.epochs=1",
            "pretrain.sweep=pre", "pretrain.overrides=[" + ",".join(f"'{o}'" for o in _PRETRAIN) + "]",
            "trainer.sweep=down"]


@pytest.fixture(scope="module")
def protocol_store(tmp_path_factory, garments):
    """Classification runs (dwconv, local_attention; seeds 0, 1), then each fine-tuned on a COCO-format
    folder and trained from scratch, by the commands `make downstream` runs."""
    root = tmp_path_factory.mktemp("protocol")
    coco = root / "coco"
    for split, stream, count in (("train2017", 0, 12), ("val2017", 1, 6)):
        write_coco(make_scenes(*garments, count, SMALL, stream), coco / split,
                   coco / "annotations" / f"instances_{split}.json")
    store = root / "results"
    pre = _command("ablate.train", "-m", "operator=dwconv,local_attention", "trainer.seed=0,1",
                   "trainer.sweep=pre", *_PRETRAIN, root=store)
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-2000:]
    down = _command("ablate.downstream", "-m", "operator=dwconv,local_attention",
                    "task.pretrained=true,false", "trainer.seed=0,1", *_downstream_overrides(coco),
                    root=store)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    return root, coco, store


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))]


def test_each_downstream_run_starts_from_its_own_classification_run(protocol_store):
    _, _, store = protocol_store
    pretrained = {(r["operator"], r["seed"]): r for r in _records(store / "pre")}
    runs = _records(store / "down")
    assert len(pretrained) == 4 and len(runs) == 8
    for run in runs:
        assert run["status"] == "completed", run.get("error")
        if run["pretrained_experiment"] == "scratch":
            continue
        source = pretrained[(run["operator"], run["seed"])]  # same operator and seed, never another's
        assert run["pretrained_experiment"] == source["experiment"]
        assert Path(run["pretrained_run"]).name == Path(source["run"]).name
    # the pretraining is part of the identity: fine-tuned and from-scratch runs are two experiments
    experiments = {(r["operator"], r["pretrained_experiment"] == "scratch"): r["experiment"] for r in runs}
    assert len(set(experiments.values())) == 4


def _pretraining_run(results: Path, operator: str, seed: int) -> Path:
    """The folder of the protocol store's classification run of `operator` and `seed` under `results`."""
    return next(p for p in (results / "pre").iterdir()
                if p.name.startswith(f"{operator}-") and f"-s{seed}-" in p.name)


def _fine_tuned_detector(results: Path, coco: Path):
    """The task and the (unstarted) detector of the downstream dwconv run of seed 1, fine-tuned from the
    classification runs under `results`."""
    from ablate.tasks import task_of

    cfg = _config(results.parent, *_downstream_overrides(coco), "operator=dwconv", "trainer.seed=1",
                  "task.pretrained=true")
    with open_dict(cfg):
        cfg.trainer.results_root = str(results)
    task = task_of(cfg)
    return task, task.build_model(cfg), cfg


def test_the_backbone_holds_the_classification_weights_at_the_first_step(protocol_store):
    """load_pretrained puts the classification run's backbone weights (all but its classifier) into
    the detector's backbone, bit for bit."""
    _, coco, store = protocol_store
    task, detector, cfg = _fine_tuned_detector(store, coco)
    said = task.start_from(detector, cfg)
    backbone = detector.features.net
    source = _pretraining_run(store, "dwconv", 1)
    saved = torch.load(source / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    state = backbone.state_dict()
    compared = [k for k in saved if not k.startswith("head.") and k in state]
    assert len(compared) > 20 and said["pretrained_experiment"] != "scratch"
    for key in compared:
        assert torch.equal(state[key], saved[key]), key


def _with_ema(source: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint rewritten as a run with optim.ema=true writes it (an average unlike
    the trained weights, as timm's ModelEmaV3 keeps it); returns the average's weights."""
    from ablate.tracking import RunStore

    state = torch.load(source / "checkpoint.pt", map_location="cpu", weights_only=True)
    average = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    RunStore(source).save_checkpoint({**state, "ema": {f"module.{k}": v for k, v in average.items()}})
    return average


def test_a_run_with_an_ema_hands_on_the_average_its_record_describes(protocol_store, tmp_path):
    """With optim.ema=true every val/test number of a classification record is the average's: the
    downstream backbone starts from the average (it started from the trained weights, which no number
    of the record describes)."""
    _, coco, store = protocol_store
    copy = tmp_path / "results"
    shutil.copytree(store / "pre", copy / "pre")
    average = _with_ema(_pretraining_run(copy, "dwconv", 1))
    task, detector, cfg = _fine_tuned_detector(copy, coco)
    task.start_from(detector, cfg)
    state = detector.features.net.state_dict()
    compared = [k for k in average if not k.startswith("head.") and k in state]
    assert len(compared) > 20
    for key in compared:
        assert torch.equal(state[key], average[key]), key


@pytest.mark.parametrize("ema", [False, True])
def test_timm_takes_a_run_checkpoint_as_its_pretrained_file(protocol_store, tmp_path, ema):
    """timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=<a run's
    checkpoint.pt>)) gives the run's model (its EMA's where it kept one), its head included; another
    num_classes gets a new head on the same body, other input channels an adapted stem, another
    img_size resized position tables; another operator's model is told which model the run is. Without
    the file's own head and stem sizes in the pretrained cfg (a hub entry states them; a file of the
    user's does not), timm refused every other head."""
    import timm

    import ablate  # noqa: F401  registers the models
    from ablate.models.weights import fit_position_tables

    _, _, store = protocol_store
    source = _pretraining_run(store, "local_attention", 0)
    if ema:
        shutil.copytree(source, tmp_path / source.name)
        source = tmp_path / source.name
        saved = _with_ema(source)
    else:
        saved = torch.load(source / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    file = dict(file=str(source / "checkpoint.pt"))

    def create(**kwargs):
        return timm.create_model("ablate_local_attention_micro", pretrained=True, pretrained_cfg_overlay=file,
                                 **kwargs)

    same = create(in_chans=1, img_size=28).state_dict()  # the file's 10 classes: no num_classes given
    assert same.keys() == saved.keys() and "state_dict" not in create(in_chans=1, img_size=28).pretrained_cfg
    for key in saved:
        assert torch.equal(same[key], saved[key]), key
    other_head = create(in_chans=1, img_size=28, num_classes=3).state_dict()
    assert other_head["head.weight"].shape == (3, saved["head.weight"].shape[1])
    assert all(torch.equal(other_head[k], saved[k]) for k in saved if not k.startswith("head."))
    colour = create(in_chans=3, img_size=28).state_dict()
    assert colour["stem.0.weight"].shape[1] == 3 and torch.equal(colour["stages.0.blocks.0.norm1.weight"],
                                                                  saved["stages.0.blocks.0.norm1.weight"])
    larger = create(in_chans=1, img_size=56).state_dict()
    fitted = fit_position_tables(saved, larger)
    resized = [k for k in saved if k.endswith("position_bias") and saved[k].shape != larger[k].shape]
    assert resized and all(torch.equal(larger[k], fitted[k]) for k in resized)
    # another operator's run names the model it is (it was torch's list of every missing key)
    with pytest.raises(ValueError, match=r"holds a run of local_attention at size micro.*"
                                         r"create ablate_local_attention_micro"):
        timm.create_model("ablate_dwconv_micro", pretrained=True, pretrained_cfg_overlay=file, in_chans=1)


@pytest.mark.parametrize("form", ["timm's train.py", "a bare legacy state dict"])
def test_timm_takes_another_weight_file_with_its_own_head_and_stem(tmp_path, form):
    """A weight file that is no run's (timm's train.py pickles its argparse arguments beside the state
    dict; an old torch.save writes no zip archive) is read as timm reads it, and it too describes its
    own head and stem: a 5-class, 3-channel model takes a 10-class, 1-channel file's body."""
    import argparse

    import timm

    import ablate  # noqa: F401  registers the models

    source = timm.create_model("ablate_dwconv_micro", in_chans=1, num_classes=10)
    file = tmp_path / "weights.pth"
    if form == "timm's train.py":
        torch.save({"arch": "ablate_dwconv_micro", "state_dict": source.state_dict(),
                    "args": argparse.Namespace(lr=0.001)}, file)
    else:
        torch.save(source.state_dict(), file, _use_new_zipfile_serialization=False)
    model = timm.create_model("ablate_dwconv_micro", pretrained=True, num_classes=5, in_chans=3,
                              pretrained_cfg_overlay=dict(file=str(file)))
    state, saved = model.state_dict(), source.state_dict()
    assert state["head.weight"].shape[0] == 5 and state["stem.0.weight"].shape[1] == 3
    assert all(torch.equal(state[k], saved[k]) for k in saved if not k.startswith(("head.", "stem.0.weight")))
    # no file: ablate publishes no weights, and says where a file goes
    with pytest.raises(RuntimeError, match=r"ablate_dwconv_micro: ablate publishes none.*overlay=dict\(file"):
        timm.create_model("ablate_dwconv_micro", pretrained=True)


@pytest.mark.parametrize("damage", ["cut", "previous epoch only"])
def test_a_damaged_classification_checkpoint_is_named_not_loaded(protocol_store, tmp_path, damage):
    """The backbone's weights come from the checkpoint of the run's last epoch, checked against its
    sha256: a cut file is refused naming the run (it was a traceback from torch.load), and where only
    an earlier epoch's checkpoint is good, those weights (not the ones the record describes) are not
    taken either."""
    from ablate.errors import BadInput

    _, coco, store = protocol_store
    copy = tmp_path / "results"
    shutil.copytree(store / "pre", copy / "pre")
    source = _pretraining_run(copy, "dwconv", 1)
    checkpoint = source / "checkpoint.pt"
    if damage == "cut":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:  # a good checkpoint of the epoch before the last beside a damaged last one
        from ablate.tracking import RunStore

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        store_of_run = RunStore(source)
        store_of_run.save_checkpoint({**state, "epoch": state["epoch"] - 1})
        store_of_run.save_checkpoint(state)
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    task, detector, cfg = _fine_tuned_detector(copy, coco)
    with pytest.raises(BadInput, match=rf"{source.name}.*(checksum|last epoch).*train it again"):
        task.start_from(detector, cfg)


def test_a_missing_classification_run_exits_2_with_the_command_that_trains_it(protocol_store, tmp_path):
    _, coco, _ = protocol_store
    done = _command("ablate.downstream", *_downstream_overrides(coco), "operator=dynamic_dwconv",
                    root=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "python -m ablate.train operator=dynamic_dwconv model=micro" in done.stderr
    assert "task.pretrained=false" in done.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_the_report_prints_table_3_and_judges_fine_tuning_against_scratch(protocol_store, tmp_path):
    """Every number of the detection table is the mean and 95% t-interval over seeds of the records;
    the claim "pretraining helps" pairs the fine-tuned and from-scratch runs by seed."""
    import pandas as pd

    from analysis.stats import t_interval

    _, _, store = protocol_store
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(store / "down"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "downstream.png").is_file() and not (out / "segmentation.csv").exists()
    table = pd.read_csv(out / "detection.csv")
    runs = _records(store / "down")
    assert len(table) == 4
    for _, row in table.iterrows():
        scratch = row["backbone"] == "scratch"
        mine = [r for r in runs if r["operator"] == row["operator"]
                and (r["pretrained_experiment"] == "scratch") == scratch]
        interval = t_interval([r["final_test_box_ap"] for r in mine])
        assert row["seeds"] == 2
        assert row["box_ap_mean"] == pytest.approx(interval.mean)
        assert row["box_ap_low"] == pytest.approx(interval.low)
        assert row["box_ap_high"] == pytest.approx(interval.high)
        assert row["gmac"] == pytest.approx(mine[0]["gmac"])
    assert "## Table 3" in (out / "index.md").read_text()
    claims = pd.read_csv(out / "claims.csv")
    helps = claims[claims["id"] == "pretraining_helps_detection_dwconv"]
    assert len(helps) == 1
    by_seed = {(r["seed"], r["pretrained_experiment"] == "scratch"): r["final_test_box_ap"]
               for r in runs if r["operator"] == "dwconv"}
    deltas = [by_seed[(s, False)] - by_seed[(s, True)] for s in (0, 1)]
    assert helps.iloc[0]["delta_top1_mean"] == pytest.approx(float(np.mean(deltas)))
    assert helps.iloc[0]["pairs"] == 2


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("task,data,metric", [("detection", "coco", "box_ap"),
                                              ("segmentation", "ade20k", "miou")])
def test_two_processes_evaluate_the_whole_test_split(folders, tmp_path, task, data, metric):
    """Under torchrun (gloo) each rank evaluates its share of the test split and the metric is computed
    over all of them: the recorded test metric equals the saved weights evaluated in one process."""
    from ablate.data import build_data
    from ablate.distributed import init_distributed
    from ablate.tasks import task_of
    from ablate.training import autocast

    root = folders[0] if data == "coco" else folders[1]
    classes = 10 if data == "coco" else 11
    overrides = [f"task={task}", f"data={data}", f"data.root={root}", "data.img_size=64", "data.in_chans=1",
                 f"data.num_classes={classes}", "data.in_memory=true", "data.num_workers=0",
                 "data.mean=[0.286]", "data.std=[0.353]", "task.pretrained=false", "schedule.epochs=1",
                 "data.val_size=2", "data.batch_size=2", "data.eval_batch_size=2"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", _free_port(),
         "-m", "ablate.downstream", "trainer=ddp", "trainer.device=cpu", *overrides, *_QUIET,
         f"trainer.results_root={tmp_path / 'results'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = next((tmp_path / "results").rglob("results.json")).parent
    record = json.loads((folder / "results.json").read_text())
    assert record["world_size"] == 2 and record["test_size"] == 6

    cfg = _config(tmp_path, *overrides)
    model = task_of(cfg).build_model(cfg)
    saved = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    test = build_data(cfg.data, torch.device("cpu"), seed=0).test
    one = init_distributed(False, "cpu")
    alone = task_of(cfg).evaluate(model, test, autocast(torch.device("cpu"), "auto"), one)
    assert alone[metric] == pytest.approx(record[f"final_test_{metric}"], abs=1e-6)
