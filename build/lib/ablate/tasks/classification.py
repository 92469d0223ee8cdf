"""Image classification: cross-entropy (mixup's soft targets where the recipe has it), top-1 and top-5."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from ablate.config import build_model
from ablate.tasks.base import Task

__all__ = ["Classification"]


class Classification(Task):
    name = "classification"
    metrics = ("top1", "top5")
    primary = "top1"

    def build_model(self, cfg: DictConfig):
        return build_model(cfg, cfg.data.img_size, cfg.data.in_chans, cfg.data.num_classes)

    def loss(self, model, images, labels, recipe, amp):
        targets = labels
        if recipe.mixup is not None:
            images, targets = recipe.mixup(images, labels)
        with amp():
            logits = model(images)
        return recipe.criterion(logits.float(), targets)

    @torch.no_grad()
    def evaluate(self, model, loader, amp, dist):
        """Top-1/top-5 in %. Under DDP each rank scores its share and the counts are summed."""
        model.eval()
        correct1 = correct5 = seen = 0
        for images, labels in loader:
            with amp():
                logits = model(images).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            seen += labels.shape[0]
        correct1, correct5, seen = dist.sum([correct1, correct5, seen])
        if seen == 0:  # data.val_size=0: no validation split
            return {"top1": float("nan"), "top5": float("nan")}
        return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen}
