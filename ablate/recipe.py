"""The training recipe of the paper (Swin's), built from timm's factories.

AdamW with the learning rate scaled linearly by the global batch size, no weight decay on norms,
biases and position tables, a per-step schedule (linear warm-up, then cosine decay; the downstream
tasks' step and poly decays), gradient clipping, label smoothing, mixup/cutmix (ImageNet), optional EMA
of the weights.

The schedules are the paper's code's, step for step (tests/test_recipe.py holds them to it):
- cosine, Swin's and DWNet's ImageNet schedule (their `build_scheduler`): one cosine over the whole
  training, from optim.lr at step 0 to min_lr at the last step, its first warm-up steps replaced by a
  line from warmup_lr. The warm-up is not a prefix that delays the cosine.
- step, mmdetection's (the 3x schedule of the paper's COCO runs): the rate times decay_rate from the
  first step of each milestone epoch, after the linear warm-up.
- poly, mmsegmentation's (the 160k schedule of the paper's ADE20K runs): (lr - min_lr) * (1 - t/T) **
  power + min_lr over the whole training. (mmcv scales the poly rate during the warm-up; here the
  warm-up is a line to optim.lr: its 1500 of 160k steps differ by under 1%.)
Swin scales warmup_lr and min_lr by the global batch as it scales the rate; so does ablate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from ablate.config import ScheduleConf
from ablate.errors import ConfigError

__all__ = ["Recipe", "build_recipe", "build_scheduler", "check_recipe", "scaled_lr"]


# The settings that only one decay reads: another value than the default with another decay would
# change nothing, so it is refused rather than recorded as a setting of the run.
_DECAY_SETTINGS = {"milestones": "step", "decay_rate": "step", "power": "poly"}


def check_recipe(optim, schedule) -> None:
    """What the schema's ranges (ablate/schema.py) cannot see: warmup within the training, and the
    decay's own settings."""
    if not schedule.warmup_epochs <= schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs={schedule.warmup_epochs} must be between 0 and "
                          f"schedule.epochs ({schedule.epochs}): lower it or raise schedule.epochs.")
    for name, decay in _DECAY_SETTINGS.items():
        value, default = getattr(schedule, name), getattr(ScheduleConf(), name)
        value = list(value) if value is not None and not isinstance(value, (int, float)) else value
        if schedule.decay != decay and value != default:
            raise ConfigError(f"schedule.{name}={value} is read by schedule.decay={decay} only, and this "
                              f"run's decay is {schedule.decay}: set schedule.decay={decay}, or leave "
                              f"schedule.{name} out.")
    if schedule.decay == "step":
        milestones = list(schedule.milestones or [])
        if not milestones:
            raise ConfigError("schedule.decay=step needs schedule.milestones, the epochs at which the rate "
                              "is multiplied by schedule.decay_rate: e.g. schedule.milestones=[27,33] "
                              "(the paper's 36-epoch COCO schedule).")
        if milestones != sorted(set(milestones)) or milestones[-1] >= schedule.epochs:
            raise ConfigError(f"schedule.milestones={milestones} must rise, each below schedule.epochs "
                              f"({schedule.epochs}): e.g. schedule.milestones=[27,33] for 36 epochs.")
        if milestones[0] < schedule.warmup_epochs:
            raise ConfigError(f"schedule.milestones={milestones} starts within the warm-up "
                              f"(schedule.warmup_epochs={schedule.warmup_epochs}): the rate would drop "
                              "before it is reached. Raise the first milestone or shorten the warm-up.")


def scaled_lr(base_lr: float, lr_batch_size: int, global_batch_size: int) -> float:
    """Swin's rule: `base_lr` is the rate at `lr_batch_size` images per step."""
    return base_lr * global_batch_size / lr_batch_size


@dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
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
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch,
                                scale=global_batch_size / optim.lr_batch_size)
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


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, steps_per_epoch: int,
                    scale: float = 1.0) -> Scheduler:
    """The rate of every step t (`scheduler.step_update(t)` sets the rate step t trains with) for the
    optimizer's rate; `scale`: the global batch over optim.lr_batch_size, which scales warmup_lr and
    min_lr as it scaled the optimizer's rate."""
    total = max(1, schedule.epochs * steps_per_epoch)
    # every decay: the warm-up's line from warmup_lr, then the decay computed from step 0 (no prefix)
    warmup = dict(warmup_t=round(schedule.warmup_epochs * steps_per_epoch),
                  warmup_lr_init=schedule.warmup_lr * scale, warmup_prefix=False, t_in_epochs=False)
    if schedule.decay == "step":
        # timm applies a milestone m at t = m - 1; mmdetection decays from the first step of epoch m
        return MultiStepLRScheduler(
            optimizer, decay_t=[round(m * steps_per_epoch) + 1 for m in schedule.milestones],
            decay_rate=schedule.decay_rate, **warmup)
    if schedule.decay == "poly":
        return PolyLRScheduler(optimizer, t_initial=total, power=schedule.power,
                               lr_min=schedule.min_lr * scale, **warmup)
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=schedule.min_lr * scale, **warmup)
