"""The tasks one training loop runs: classification, detection with instance masks, segmentation.

    task = task_of(cfg)   # cfg.task.name, classification where the config has no task
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ablate.tasks.base import Task
from ablate.tasks.classification import Classification
from ablate.tasks.dense import Detection, Segmentation

__all__ = ["TASKS", "Task", "task_of"]

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Detection, Segmentation)}


def task_of(cfg: DictConfig) -> Task:
    """A fresh task object for `cfg` (one per run: a task keeps what its model was built with)."""
    return TASKS[OmegaConf.select(cfg, "task.name", default="classification")]()
