"""A trained model's weights, taken out of a run's checkpoint and fitted to another model of its kind.

Shared by the two ways a backbone starts from a classification run: a downstream run
(`ablate.tasks.pretrained`) and timm's `pretrained=True` with a run's checkpoint as the file
(`ablate.models.zoo`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["evaluated_weights", "fit_position_tables", "is_run_checkpoint"]

EMA_PREFIX = "module."  # timm's ModelEmaV3 keeps the averaged model as its submodule `module`


def is_run_checkpoint(state: object) -> bool:
    """Whether `state` is the checkpoint a training run writes (ablate.training: the trained weights
    under "model", the EMA's, or None, under "ema", beside the optimizer, epoch, identity, ...)."""
    return isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) and "ema" in state


def evaluated_weights(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The weights a run's checkpoint was evaluated with: the exponential moving average's where the
    run kept one (optim.ema=true: every val/test metric of its record is the average's), else the
    trained weights. Starting another model from the trained weights of such a run would start it from
    a model that the record's numbers do not describe."""
    ema = checkpoint.get("ema")
    if ema is None:
        return dict(checkpoint["model"])
    return {key[len(EMA_PREFIX):]: value for key, value in ema.items() if key.startswith(EMA_PREFIX)}


def fit_position_tables(weights: Mapping[str, torch.Tensor],
                        target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position-bias tables resized to the model's windows, as Swin fine-tunes at another size: a
    stage whose map is smaller than the window has its window cut to the map, so the same model has
    tables of another size at another input size (micro's last stage: a 2 x 2 map at 28 px, 4 x 4 at
    64). A table (groups, (2w - 1)^2) is a (2w - 1) x (2w - 1) grid of relative offsets; it is
    resized bicubically to the new grid. Other tensors are left as they are."""
    fitted = dict(weights)
    for key, value in weights.items():
        want = target.get(key)
        if (not key.endswith("position_bias") or want is None or want.shape == value.shape
                or value.dim() != 2):
            continue
        old, new = math.isqrt(value.shape[1]), math.isqrt(want.shape[1])
        if old * old != value.shape[1] or new * new != want.shape[1]:
            continue
        grid = value.reshape(1, value.shape[0], old, old).float()
        resized = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=True)
        fitted[key] = resized.reshape(value.shape[0], new * new).to(value.dtype)
    return fitted
