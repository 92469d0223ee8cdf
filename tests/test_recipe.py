"""The learning-rate schedules against the paper's code: Swin's and DWNet's cosine (ImageNet),
mmdetection's step (COCO 3x) and mmsegmentation's poly (ADE20K 160k), step by step."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ablate.config import CONF_DIR, ScheduleConf
from ablate.errors import ConfigError
from ablate.recipe import build_recipe, build_scheduler, check_recipe
from ablate.runs import run_folder
from ablate.tracking.identity import (
    LATER_DEFAULTS,
    describe_difference,
    experiment_key,
    experiment_of,
    flatten,
    identity_from_config,
)
from ablate.training import train
from analysis.experiments import distinguishing_settings


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def rates(schedule, steps_per_epoch: int, lr: float = 1.0, scale: float = 1.0) -> list[float]:
    """The rate each step of the training trains with, as the training loop sets it
    (`step_update(t)` before step t; the optimizer's initial rate before step 0)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch, scale=scale)
    seen = []
    for t in range(schedule.epochs * steps_per_epoch):
        scheduler.step_update(t)
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def swin_cosine(t: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Swin's (and DWNet's) build_scheduler: timm's cosine with t_initial = all steps, the warm-up's line
    replacing its first steps (no prefix)."""
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def test_cosine_is_swins_one_cosine_over_the_whole_training():
    schedule = composed("schedule.epochs=4", "schedule.warmup_epochs=0.5", "schedule.warmup_lr=0.01",
                        "schedule.min_lr=0.001").schedule
    seen = rates(schedule, steps_per_epoch=10)
    want = [swin_cosine(t, 40, 5, 1.0, 0.01, 0.001) for t in range(40)]
    assert seen == pytest.approx(want, abs=1e-12)
    # the halfway step is halfway between the rate and its floor, and the last step is at the floor:
    # a warm-up that delayed the cosine (as before) left 3.8% of the rate at the end of 4 epochs
    assert seen[20] == pytest.approx((1.0 + 0.001) / 2)
    assert seen[-1] == pytest.approx(0.001, abs=2e-3)
    assert seen[0] == 0.01 and seen[4] == pytest.approx(0.01 + 4 * 0.99 / 5)


def test_warmup_and_floor_scale_with_the_batch_as_the_rate_does():
    """Swin's main.py scales BASE_LR, WARMUP_LR and MIN_LR alike by the global batch over 512."""
    cfg = composed("schedule.epochs=2", "schedule.warmup_epochs=1", "schedule.warmup_lr=4e-6",
                   "schedule.min_lr=8e-6", "optim.lr=1e-3", "optim.lr_batch_size=512")
    model = torch.nn.Linear(2, 2)
    recipe = build_recipe(model, cfg.optim, cfg.schedule, num_classes=2, global_batch_size=128,
                          steps_per_epoch=10)
    assert recipe.lr == pytest.approx(2.5e-4)
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # step 0: warmup_lr x 1/4
    recipe.scheduler.step_update(20)
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(2e-6)  # the end: min_lr x 1/4


def test_step_decays_from_the_first_step_of_each_milestone_epoch():
    """mmdetection's step policy (by epoch): lr x decay_rate ** (milestones passed), after a linear
    warm-up from warmup_lr."""
    schedule = composed("schedule.epochs=4", "schedule.decay=step", "schedule.milestones=[2,3]",
                        "schedule.decay_rate=0.1", "schedule.warmup_epochs=0.5",
                        "schedule.warmup_lr=0.001").schedule
    seen = rates(schedule, steps_per_epoch=10)
    assert seen[:5] == pytest.approx([0.001 + t * 0.999 / 5 for t in range(5)])
    assert seen[5:20] == pytest.approx([1.0] * 15)
    assert seen[20:30] == pytest.approx([0.1] * 10)
    assert seen[30:] == pytest.approx([0.01] * 10)


@pytest.mark.parametrize("power", [1.0, 0.9, 2.0])
def test_poly_is_mmsegmentations(power):
    """mmsegmentation's poly policy: (lr - min_lr) * (1 - t/T) ** power + min_lr over all T steps."""
    schedule = composed("schedule.epochs=2", "schedule.decay=poly", f"schedule.power={power}",
                        "schedule.min_lr=0.0", "schedule.warmup_epochs=0.2", "schedule.warmup_lr=0").schedule
    seen = rates(schedule, steps_per_epoch=10, lr=6.0)
    assert seen[:2] == pytest.approx([0.0, 3.0])
    assert seen[2:] == pytest.approx([6.0 * (1 - t / 20) ** power for t in range(2, 20)])


@pytest.mark.parametrize("recipe, steps_per_epoch, at", [
    # COCO: 117287 training images at 16 a step; the rate drops at epochs 27 and 33 of 36
    ("detection_paper", 7330, {0: 1e-7, 500: 1e-4, 27 * 7330 - 1: 1e-4, 27 * 7330: 1e-5, 33 * 7330: 1e-6}),
    # ADE20K: 19210 training images at 16 a step; 1500 warm-up steps, then poly to 0 at 160k
    ("segmentation_paper", 1201, {1501: 6e-5 * (1 - 1501 / 159733), 80000: 6e-5 * (1 - 80000 / 159733)}),
])
def test_the_papers_downstream_recipes(recipe, steps_per_epoch, at):
    cfg = composed(f"recipe={recipe}", "model=tiny")
    assert cfg.model.drop_path_rate == (0.3 if recipe == "segmentation_paper" else 0.2)  # the paper's configs
    schedule = cfg.schedule
    check_recipe(None, schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch)
    assert round(schedule.warmup_epochs * steps_per_epoch) in (500, 1500)  # the paper's 500 and 1500 steps
    for t, want in at.items():
        scheduler.step_update(t)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9), t


@pytest.mark.parametrize("overrides, message", [
    (["schedule.decay=step"], "schedule.decay=step needs schedule.milestones"),
    (["schedule.decay=step", "schedule.milestones=[3,2]"], "must rise"),
    (["schedule.decay=step", "schedule.milestones=[2,2]"], "must rise"),
    (["schedule.decay=step", "schedule.milestones=[300]"], "each below schedule.epochs"),
    (["schedule.decay=step", "schedule.milestones=[0.25]"], "starts within the warm-up"),
    (["schedule.power=2"], "schedule.power=2.0 is read by schedule.decay=poly only"),
    (["schedule.decay=poly", "schedule.milestones=[5]"],
     "schedule.milestones=[5.0] is read by schedule.decay=step"),
    (["schedule.decay_rate=0.5"], "schedule.decay_rate=0.5 is read by schedule.decay=step only"),
])
def test_a_decay_setting_that_cannot_act_is_refused(overrides, message):
    schedule = composed(*overrides).schedule
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_recipe(None, schedule)


def _identity(*overrides: str) -> dict:
    cfg = composed(*overrides)
    return identity_from_config(OmegaConf.to_container(cfg, resolve=True), cfg.trainer.seed)


def test_the_decay_settings_leave_earlier_runs_their_identity():
    """Every run before the decay settings existed was cosine: at cosine (and the other decays' own
    settings at their defaults) the identity is what it was, so those runs keep their folders and
    experiments; another decay is another experiment, and says which setting differs."""
    defaults = ScheduleConf()
    assert LATER_DEFAULTS == {f"schedule.{k}": getattr(defaults, k) for k in ("decay", "milestones",
                                                                              "decay_rate", "power")}
    default = _identity()
    assert "decay" not in default["schedule"] and "milestones" not in default["schedule"]
    assert set(default["schedule"]) == {"epochs", "warmup_epochs", "warmup_lr", "min_lr"}
    assert _identity("schedule.decay=cosine", "schedule.power=1.0") == default
    step = _identity("schedule.decay=step", "schedule.milestones=[2,3]")
    assert experiment_key(step) != experiment_key(default)
    assert step["schedule"]["decay"] == "step" and step["schedule"]["milestones"] == [2.0, 3.0]
    assert "schedule.decay: cosine (default) recorded, step here" in describe_difference(default, step)
    rows = [flatten(experiment_of(i)) for i in (default, step)]
    assert distinguishing_settings(rows) == ["schedule.decay=cosine, schedule.milestones=null",
                                             "schedule.decay=step, schedule.milestones=[2,3]"]


def test_a_run_records_the_rate_each_epoch_trained_at(tmp_path):
    """The metrics row's lr is the rate of the epoch's last step: under a step decay at epoch 1 the
    first epoch shows the full rate, the second a tenth (the rate after the epoch showed the drop one
    epoch early)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data.train_subset=256", "data.val_size=100", "data.test_subset=100", "data.batch_size=64",
            "trainer.quiet=true", "trainer.threads=1", "trainer.inference_batches=0", "logger=none",
            f"trainer.results_root={tmp_path}", "schedule.epochs=2", "schedule.decay=step",
            "schedule.milestones=[1]", "schedule.warmup_epochs=0.5", "optim.lr=1e-3",
            "optim.lr_batch_size=64"])
    train(cfg)
    rows = [json.loads(line) for line in (run_folder(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-4])
