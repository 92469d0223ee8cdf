"""Plan a sweep: expand its grids into jobs and sort each job by what its run folder already holds.

Hydra's basic sweeper takes one cartesian product. A figure or table often needs a union of a few
(the presets x seeds, plus one preset x channels_per_group x seeds), so a sweep file may list
`grids`; every grid is multiplied with the shared `params` and with the command line, whose values
win on a shared key. Jobs that resolve to the same run folder run once; a job whose run folder holds
another run, or is that of an earlier job with other settings (a fixed trainer.run_name), is refused
and not launched.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ablate.config import build_model, check_train_config
from ablate.distributed import checked_device
from ablate.errors import ConfigError
from ablate.recipe import check_recipe
from ablate.runs import check_processes, record_unrunnable, run_folder, run_identity
from ablate.space.rules import InvalidOperatorError
from ablate.tracking import FINISHED, RunStore
from ablate.tracking.identity import IdentityConflict, describe_difference, differing_keys

__all__ = ["Job", "expand_grids", "job_processes", "plan_jobs"]


@dataclass
class Job:
    """One cell of a sweep: its overrides, its run folder and what the plan decided."""

    overrides: list[str]
    folder: Path
    state: str  # "finished" (recorded earlier), "invalid" (recorded as skipped now), "refused", "run"
    cfg: DictConfig | None = field(default=None, repr=False)  # the job's config, without `hydra`
    reason: str | None = None  # for invalid cells: the rule and the nearest valid settings
    status: str | None = None  # the recorded status after the sweep (or before, when finished);
    # "refused" when the run folder is another run's: nothing is recorded there
    error: str | None = None


def _key(override: str) -> str:
    return OverridesParser.create().parse_override(override).get_key_element()


def _as_overrides(params: Mapping[str, Any] | None) -> list[str]:
    return [f"{k}={v}" for k, v in (params or {}).items()]


def expand_grids(
    arguments: Sequence[str],
    params: Mapping[str, Any] | None = None,
    grids: Iterable[Mapping[str, Any]] | None = None,
) -> list[list[str]]:
    """Every job's overrides: for each grid, the product of params, the grid and the command line.

    Later sources win on a key: params < grid < command line. Without grids: one product.
    """
    jobs: list[list[str]] = []
    for grid in list(grids or []) or [{}]:
        merged: dict[str, str] = {}
        for source in (_as_overrides(params), _as_overrides(grid), list(arguments)):
            for override in source:
                merged[_key(override)] = override
        parsed = OverridesParser.create().parse_overrides(list(merged.values()))
        for job in BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]:
            if job not in jobs:
                jobs.append(job)
    return jobs


def job_config(config_loader, master: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config the job function will see (composed as the launcher will, minus `hydra`)."""
    cfg = config_loader.load_sweep_config(master, list(overrides))
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_jobs(config_loader, master: DictConfig, job_overrides: Sequence[Sequence[str]]) -> None:
    """Compose and validate jobs without planning them (a later phase's, before the first trains):
    raises the error its job would meet."""
    for overrides in job_overrides:
        check_job_config(master, job_config(config_loader, master, overrides))


def check_job_config(master: DictConfig, cfg: DictConfig) -> None:
    """Every field in its range, the recipe's relations (warm-up within the training, the decay's
    settings) and, where the jobs run on this machine, its device: what a launched job would fail on
    at once, found before any job is launched (exit 2, as the single run; not a failed record per job)."""
    check_train_config(cfg)
    check_recipe(cfg.optim, cfg.schedule)
    if runs_here(master):
        checked_device(cfg.trainer.device, "trainer.device")


def runs_here(master: DictConfig) -> bool:
    """Whether the sweep's launcher runs its jobs on this machine: every launcher but a cluster's,
    whose jobs meet the nodes' devices (a login node without a GPU sweeps GPU jobs)."""
    return "SlurmLauncher" not in str(OmegaConf.select(master, "hydra.launcher._target_", default=""))


def check_operator(cfg: DictConfig) -> None:
    """Raise InvalidOperatorError for an invalid cell; builds on the meta device, so it is instant."""
    with torch.device("meta"):
        build_model(cfg, cfg.data.img_size, cfg.data.in_chans, cfg.data.num_classes)


def job_processes(master: DictConfig, cfg: DictConfig) -> int:
    """The processes that train a job of this sweep under trainer=ddp: a submitit launcher's tasks
    (tasks_per_node x nodes), or torchrun's processes where the sweep itself runs under torchrun;
    else one. Tasks without trainer=ddp would each train the run alone, all but one refused its
    folder: a ConfigError."""
    tasks = (int(OmegaConf.select(master, "hydra.launcher.tasks_per_node", default=None) or 1)
             * int(OmegaConf.select(master, "hydra.launcher.nodes", default=None) or 1))
    if tasks == 1 and cfg.trainer.distributed:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if tasks > 1 and not cfg.trainer.distributed:
        raise ConfigError(f"hydra.launcher.tasks_per_node x nodes = {tasks} starts {tasks} processes per "
                          "job, and only trainer=ddp makes them train one run together (without it each "
                          "would train the run alone): add trainer=ddp, or set "
                          "hydra.launcher.tasks_per_node=1 and hydra.launcher.nodes=1")
    return tasks if cfg.trainer.distributed else 1


def plan_jobs(config_loader, master: DictConfig, job_overrides: Sequence[Sequence[str]]) -> list[Job]:
    """Compose every job and decide: finished (skip), invalid (record as skipped), refused (its run
    folder is another run's), or run.

    A composition error (a misspelt key or option), a value out of its range (ablate/schema.py) or a
    recipe that cannot be (ablate/recipe.py) raises here, before any job is launched.
    """
    jobs, claimed = [], {}  # run folder -> identity of the job of this sweep that runs in it
    for overrides in job_overrides:
        cfg = job_config(config_loader, master, overrides)
        check_job_config(master, cfg)
        folder, identity = run_folder(cfg), run_identity(cfg)
        if folder in claimed:
            if not differing_keys(claimed[folder], identity):  # two spellings of the same run
                continue
            error = (f"jobs of this sweep with different settings map to one run folder {folder} "
                     f"({describe_difference(claimed[folder], identity, 'in an earlier job')}). Give each "
                     "job its own trainer.run_name, or none: the default name differs per run.")
            jobs.append(Job(list(overrides), folder, "refused", cfg, status="refused", error=error))
            continue
        store = RunStore(folder)
        try:  # a finished record of another run is not this job's
            store.check_identity(identity)
        except IdentityConflict as err:
            jobs.append(Job(list(overrides), folder, "refused", cfg, status="refused", error=str(err)))
            continue
        claimed[folder] = identity  # by the first job the folder accepts, not by one it refused
        status = store.status()
        if status in FINISHED:
            try:  # a record of another number of processes is another experiment, as in a single run
                check_processes(folder, store.read_results() or {}, job_processes(master, cfg))
            except IdentityConflict as err:
                jobs.append(Job(list(overrides), folder, "refused", cfg, status="refused", error=str(err)))
                continue
            jobs.append(Job(list(overrides), folder, "finished", cfg, status=status))
            continue
        job_processes(master, cfg)  # tasks without trainer=ddp: refused before any job is launched
        try:
            check_operator(cfg)
        except InvalidOperatorError as err:
            record_unrunnable(cfg, err)
            jobs.append(Job(list(overrides), folder, "invalid", cfg, reason=str(err), status="skipped"))
            continue
        jobs.append(Job(list(overrides), folder, "run", cfg))
    return jobs
