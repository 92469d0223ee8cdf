"""What one training loop needs to know of a task: its model, its loss, its numbers.

ablate/training.py runs any task: classification (the paper's ImageNet experiments and every study
here), object detection with instance masks and semantic segmentation (its Tables 3 and 4). A task
says which metrics it reports (a record holds val_<metric>, test_<metric>, best_<split>_<metric> and
final_<split>_<metric> for each), which one picks the best epoch, and how a batch becomes a loss.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

__all__ = ["Task"]


class Task:
    """A task's hooks; the data it trains on is `ablate.data.build_data`'s (the data set's builder
    decides its format)."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    primary: str = ""  # the validation metric that picks the best epoch

    def build_model(self, cfg: DictConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: Any, recipe,
             amp: Callable) -> torch.Tensor:
        """The batch's loss (a 0-d tensor), the forward under `amp`."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, amp: Callable, dist) -> dict[str, float]:
        """Every metric of `self.metrics` on `loader`'s samples (under DDP: all ranks' together)."""
        raise NotImplementedError

    def infer(self, model: nn.Module, inputs: torch.Tensor) -> Any:
        """One inference forward (what the throughput times)."""
        return model(inputs)

    def start_from(self, model: nn.Module, cfg: DictConfig) -> dict[str, Any]:
        """Load what the model starts from (the downstream tasks: the pretraining run's backbone),
        once the data are found; returns what the record says of it."""
        return {}
