"""The training recipe of the paper (Swin's), built from timm's factories.

AdamW with the learning rate scaled linearly by the global batch size, no weight decay on norms,
biases and position tables, cosine schedule with linear warmup (per step), gradient clipping, label
smoothing, mixup/cutmix (ImageNet), optional EMA of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from ablate.errors import ConfigError

__all__ = ["Recipe", "build_recipe", "check_recipe", "scaled_lr"]


def check_recipe(optim, schedule) -> None:
    """What the schema's ranges (ablate/schema.py) cannot see: warmup within the training."""
    if not schedule.warmup_epochs <= schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs={schedule.warmup_epochs} must be between 0 and "
                          f"schedule.epochs ({schedule.epochs}): lower it or raise schedule.epochs.")


def scaled_lr(base_lr: float, lr_batch_size: int, global_batch_size: int) -> float:
    """Swin's rule: `base_lr` is the rate at `lr_batch_size` images per step."""
    return base_lr * global_batch_size / lr_batch_size


@dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    lr: float


def build_recipe(model: nn.Module, optim, schedule, num_classes: int, global_batch_size: int,
                 steps_per_epoch: int) -> Recipe:
    lr = scaled_lr(optim.lr, optim.lr_batch_size, global_batch_size)
    # filter_bias_and_bn: 1-D parameters (norms, biases) and model.no_weight_decay() take no decay.
    # On a GPU the fused AdamW kernel updates every parameter in a few launches (a micro model's step
    # is launch-bound); on the CPU the default (foreach) form stays, so CPU runs keep their numbers.
    on_gpu = all(p.is_cuda for p in model.parameters())
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=optim.weight_decay,
                                    betas=tuple(optim.betas), eps=optim.eps, filter_bias_and_bn=True,
                                    **({"fused": True} if on_gpu else {}))
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, schedule.epochs * steps_per_epoch), lr_min=schedule.min_lr,
        warmup_t=round(schedule.warmup_epochs * steps_per_epoch), warmup_lr_init=schedule.warmup_lr,
        warmup_prefix=True, t_in_epochs=False)
    mixup = None
    if optim.mixup > 0 or optim.cutmix > 0:
        mixup = Mixup(mixup_alpha=optim.mixup, cutmix_alpha=optim.cutmix, prob=optim.mixup_prob,
                      switch_prob=optim.mixup_switch_prob, label_smoothing=optim.label_smoothing,
                      num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()  # mixup makes the smoothed soft targets
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
    ema = ModelEmaV3(model, decay=optim.ema_decay) if optim.ema else None
    return Recipe(optimizer, scheduler, criterion, mixup, ema, lr)
