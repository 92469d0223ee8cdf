"""The numbers the field reports for the paper's other two tasks, from maintained libraries.

- detection and instance segmentation: COCO's AP (pycocotools' COCOeval: AP averaged over IoU 0.50:0.95,
  AP at 0.50 and 0.75), for boxes and for masks, in percent;
- semantic segmentation: the confusion matrix over labelled pixels (torchmetrics), then mIoU (the mean
  over classes of intersection over union, classes absent from both labels and predictions left out,
  as mmsegmentation does) and pixel accuracy (all labelled pixels), in percent.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DETECTION_METRICS", "SEGMENTATION_METRICS", "coco_metrics", "confusion", "segmentation_metrics"]

DETECTION_METRICS = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
SEGMENTATION_METRICS = ("miou", "pixel_acc")


def _evaluate(coco_gt, results: list[dict], iou_type: str, image_ids: Sequence[int]) -> list[float]:
    from pycocotools.cocoeval import COCOeval

    if not results:  # nothing detected: COCO's loadRes refuses an empty list
        return [0.0, 0.0, 0.0]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        dt = coco_gt.loadRes(results)  # a new COCO of the results; the ground truth is left as it is
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0..2]: AP@[.5:.95], AP@.5, AP@.75 over all areas, 100 detections per image; -1: no ground truth
    return [max(float(v), 0.0) * 100.0 for v in ev.stats[:3]]


def coco_metrics(coco_gt, image_ids: Sequence[int], detections: list[dict[str, Any]]) -> dict[str, float]:
    """Box and mask AP of `detections` (COCO results: image_id, category_id, bbox [x, y, w, h], score,
    and segmentation as RLE) on the images `image_ids` of the ground truth `coco_gt` (pycocotools COCO)."""
    boxes = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in detections]
    masks = [{k: d[k] for k in ("image_id", "category_id", "segmentation", "score")} for d in detections
             if "segmentation" in d]
    box = _evaluate(coco_gt, boxes, "bbox", image_ids)
    mask = _evaluate(coco_gt, masks, "segm", image_ids)
    return dict(zip(DETECTION_METRICS, box + mask))


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore: int) -> torch.Tensor:
    """(classes, classes) counts, rows the labels, columns the predictions; `ignore`d pixels left out."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(preds.flatten(), labels.flatten(), num_classes, ignore_index=ignore,
                                       normalize="none").to(torch.int64)


def segmentation_metrics(matrix: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy (percent) of a confusion matrix of labelled pixels."""
    m = matrix.double().cpu().numpy()
    hits = np.diag(m)
    union = m.sum(0) + m.sum(1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
    total = m.sum()
    return {"miou": float(np.nanmean(iou) * 100.0) if np.isfinite(iou).any() else 0.0,
            "pixel_acc": float(hits.sum() / total * 100.0) if total else 0.0}
