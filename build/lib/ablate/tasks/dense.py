"""Object detection with instance masks (Mask R-CNN) and semantic segmentation (UPerNet) as tasks.

The model is the run's backbone (the config's operator at `data.img_size`) under the task's head
(`head.*`, ablate/models/dense.py), its backbone loaded from the classification run the config names
(ablate/tasks/pretrained.py) unless `task.pretrained=false`. Detection scores boxes and masks with
COCO's AP against the annotation file (predictions mapped back to each image's own size first);
segmentation scores mIoU and pixel accuracy over the labelled pixels of the letterboxed label maps.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ablate.config import build_model
from ablate.data.dense import IGNORE_LABEL, letterbox_size
from ablate.errors import ConfigError
from ablate.models.dense import MaskRCNN, UPerNet, head_settings
from ablate.ops.mixer import apply_backend
from ablate.tasks.base import Task
from ablate.tasks.metrics import (
    DETECTION_METRICS,
    SEGMENTATION_METRICS,
    coco_metrics,
    confusion,
    segmentation_metrics,
)
from ablate.tasks.pretrained import load_pretrained

__all__ = ["Detection", "Segmentation", "coco_results"]


def _head(cfg: DictConfig, name: str) -> dict[str, Any]:
    """The head's settings (conf/head/*.yaml over the model size's defaults); ConfigError naming the
    key where the config holds a setting the head does not have, or another task's head."""
    given = OmegaConf.to_container(cfg.head, resolve=True)
    if given.pop("name", name) != name:
        raise ConfigError(f"head={cfg.head.name} is not a head of task={cfg.task.name}: use head={name}.")
    try:
        return head_settings(name, cfg.model.size.name, given)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class _Dense(Task):
    def _backbone(self, cfg: DictConfig):
        """The AblateNet of the run at the task's input size, without a classifier."""
        return build_model(cfg, cfg.data.img_size, cfg.data.in_chans, 0)

    def start_from(self, model, cfg: DictConfig) -> dict[str, Any]:
        if not cfg.task.pretrained:
            return {"pretrained_run": None, "pretrained_experiment": "scratch"}
        return load_pretrained(model.features.net, cfg)


class Detection(_Dense):
    name = "detection"
    metrics = DETECTION_METRICS
    primary = "box_ap"

    def build_model(self, cfg: DictConfig):
        # classes + 1: the background is one for Mask R-CNN
        model = MaskRCNN(self._backbone(cfg), cfg.data.num_classes + 1, **_head(cfg, "mask_rcnn"))
        return apply_backend(model, OmegaConf.select(cfg, "ops.backend", default="fast"))

    def loss(self, model, images, targets, recipe, amp):
        with amp():
            losses = model(list(images), targets)
        return sum(loss.float() for loss in losses.values())

    def infer(self, model, images):
        return model(list(images))

    @torch.no_grad()
    def evaluate(self, model, loader, amp, dist):
        model.eval()
        split = loader.split
        results = []
        for images, targets in loader:
            with amp():
                outputs = model(list(images))
            for out, target in zip(outputs, targets):
                results += coco_results(out, target, images.shape[-1], split.category_ids)
        results = dist.gather(results)
        image_ids = [split.image_ids[int(i)] for i in loader.indices]
        if not image_ids:
            return dict.fromkeys(self.metrics, float("nan"))
        return coco_metrics(split.coco, image_ids, results)


def coco_results(out: dict[str, torch.Tensor], target: dict[str, Any], side: int,
                 category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's detections (the head's output on its letterboxed `side` x `side` input) as COCO
    results on the image's own pixels: boxes scaled back and clipped to the image (the head clips to
    the letterboxed input, padding included), masks cut from the padding and resized to the image."""
    from pycocotools import mask as coco_mask

    h, w = target["orig_size"]
    scale, nh, nw = letterbox_size(h, w, side)
    boxes = (out["boxes"].float() / scale).cpu()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    masks = out["masks"].float()[:, :, :nh, :nw]
    if len(masks):
        masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
    masks = (masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    results = []
    for box, label, score, mask in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].float().tolist(),
                                       masks):
        counts = coco_mask.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        results.append({"image_id": target["image_id"], "score": score,
                        "category_id": category_ids[label - 1],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "segmentation": {"size": [h, w], "counts": counts}})
    return results


class Segmentation(_Dense):
    name = "segmentation"
    metrics = SEGMENTATION_METRICS
    primary = "miou"

    def build_model(self, cfg: DictConfig):
        model = UPerNet(self._backbone(cfg), cfg.data.num_classes, **_head(cfg, "upernet"))
        self.aux_weight = model.aux_weight  # the loss reads it here: the model may be wrapped (DDP)
        return apply_backend(model, OmegaConf.select(cfg, "ops.backend", default="fast"))

    def loss(self, model, images, targets, recipe, amp):
        labels = torch.stack([t["labels"] for t in targets])
        with amp():
            logits, aux = model(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL)
        return loss + self.aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_LABEL)

    @torch.no_grad()
    def evaluate(self, model, loader, amp, dist):
        model.eval()
        classes = loader.split.num_classes
        matrix = torch.zeros(classes, classes, dtype=torch.int64)
        for images, targets in loader:
            with amp():
                logits = model(images)
            labels = torch.stack([t["labels"] for t in targets])
            matrix += confusion(logits.argmax(1), labels, classes, IGNORE_LABEL).cpu()
        matrix = torch.tensor(dist.sum(matrix.flatten().tolist()), dtype=torch.int64).view(classes, classes)
        return segmentation_metrics(matrix)
