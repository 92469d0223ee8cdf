"""The Hydra sweeper of ablate: plan, launch what is missing, follow, summarize.

Configured by `hydra.sweeper` (conf/hydra/sweeper/grid.yaml, and the files of `sweeps/`):

    params:          overrides shared by every grid (Hydra's basic sweeper syntax: `a: 1,2,3`)
    grids:           a list of grids (each a dict like `params`); the jobs are their union
    max_batch_size:  jobs handed to the launcher at once (null: all; a launcher runs a batch in
                     parallel as far as it can)
    retries:         launches again, up to this many times, the jobs that ended without a record
                     (a killed process, a lost node); they resume from their checkpoints
    poll_seconds:    how often the progress line looks at the results store
    tune:            null, or {setting, values, seed, metric}: every cell at its own value of `setting`,
                     chosen on the validation split with one seed, then trained with every seed
                     (ablate/sweep/tuning.py)
"""
from __future__ import annotations

import difflib
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from ablate.config import sweep_name
from ablate.errors import BadInput, ConfigError, as_the_sweep_process
from ablate.runs import record_unrunnable
from ablate.sweep.local import controllers_ignoring_sigint
from ablate.sweep.plan import Job, check_jobs, expand_grids, plan_jobs
from ablate.sweep.progress import Overall, SweepProgress, recorded_since, summarize, summary_text
from ablate.sweep.tuning import TuningPlan, parse_tuning
from ablate.tracking import RunStore, scrub
from ablate.tracking.wandb_logger import resolve_mode

__all__ = ["GridSweeper", "register_sweeper"]

log = logging.getLogger("ablate.sweep")


_SETTINGS = ("max_batch_size", "params", "grids", "poll_seconds", "retries", "tune")


def _check_settings(max_batch_size, params, grids, poll_seconds, retries, unknown: Mapping[str, Any]) -> None:
    """hydra.sweeper's own settings, named with what to set, as the schema names a training value:
    Hydra hands them to the constructor unchecked (a misspelt key became a TypeError, `retries: -1`
    launched nothing and crashed, a grid that is not a list of mappings a Python message)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    where = "hydra.sweeper"
    if unknown:
        near = [m for k in unknown for m in difflib.get_close_matches(k, _SETTINGS, n=1)]
        hint = f". Did you mean {' or '.join(f'{where}.{m}' for m in near)}?" if near else ""
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; it takes "
                          f"{', '.join(_SETTINGS)}{hint}")
    if max_batch_size is not None and not (is_int(max_batch_size) and max_batch_size >= 1):
        raise ConfigError(f"{where}.max_batch_size={max_batch_size!r} must be an integer >= 1 or null (all "
                          "jobs at once)")
    if not (is_int(retries) and retries >= 0):
        raise ConfigError(f"{where}.retries={retries!r} must be an integer >= 0 (0: never relaunch a job "
                          "that ended without a record)")
    if isinstance(poll_seconds, bool) or not isinstance(poll_seconds, (int, float)) \
            or not math.isfinite(poll_seconds) or poll_seconds <= 0:
        raise ConfigError(f"{where}.poll_seconds={poll_seconds!r} must be a number > 0 (seconds between "
                          "two looks at the results store)")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping of setting: values (e.g. {{trainer.seed: "
                          f"'0,1,2'}}); got {params!r}")
    if grids is not None:
        if isinstance(grids, str) or not isinstance(grids, Sequence) \
                or not all(isinstance(g, Mapping) for g in grids):
            raise ConfigError(f"{where}.grids must be a list of grids, each a mapping of setting: values "
                              f"(e.g. [{{operator: 'dwconv,local_mlp'}}]); got {grids!r}")
        if not grids:  # a union of no grids has no jobs: not the one default job that null means
            raise ConfigError(f"{where}.grids is an empty list: list at least one grid, or remove the key "
                              "(null: the product of params and the command line)")


class GridSweeper(Sweeper):
    """Hydra's basic sweeper semantics plus grid unions, skipping of finished runs and invalid cells,
    progress, and a sweep that goes on past a failed job."""

    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, Any] | None = None,
                 grids: Sequence[Mapping[str, Any]] | None = None, poll_seconds: float = 2.0,
                 retries: int = 1, tune: Mapping[str, Any] | None = None, **unknown: Any):
        super().__init__()
        _check_settings(max_batch_size, params, grids, poll_seconds, retries, unknown)
        self.tuning = parse_tuning(tune)
        self.max_batch_size, self.poll_seconds, self.retries = max_batch_size, poll_seconds, retries
        self.params = dict(params or {})
        self.grids = [dict(g) for g in grids or []]
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[Any]]:
        with as_the_sweep_process():  # the workers it starts end with it
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> list[Sequence[Any]]:
        assert self.config is not None and self.launcher is not None
        started = time.time()
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the launchers' job lines
        name = sweep_name(self.config.trainer.sweep)
        results_dir = Path(self.config.trainer.results_root) / name
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # the sweep's config as given, its secrets redacted as in every run's config.yaml (a key given
        # on the command line is in it three times: the config, Hydra's overrides and their joined name)
        given = OmegaConf.create(scrub(OmegaConf.to_container(self.config)))
        OmegaConf.save(given, sweep_dir / "multirun.yaml")
        if self.config.logger.name == "wandb":  # whether W&B can be reached: decided once, for every job
            resolve_mode(self.config.logger.mode)  # (workers inherit it), not by each run's timeout

        overrides = expand_grids(arguments, self.params, self.grids)
        returns: list[Sequence[Any]] = []
        all_jobs: list[Job] = []
        overall = None
        if self.tuning is not None:  # phase 1: each cell at every value, one seed; choose on validation
            plan = TuningPlan(self.tuning, overrides)
            followers = (expand_grids(arguments, self.params, self.tuning.follow_grids)
                         if self.tuning.follow_grids else [])
            # a bad value in a follower must not wait for the phases before it to train
            check_jobs(self.hydra_context.config_loader, self.config,
                       [[*f, f"{self.tuning.setting}={self.tuning.values[0]}"] for f in followers])
            overall = Overall(0, started)
            later = plan.new_final_jobs() + len(followers)
            jobs = self._run_phase(name, f"selection of {self.tuning.setting}", plan.selection_jobs(),
                                   results_dir, returns, overall, later=later)
            all_jobs += jobs
            by_overrides = {tuple(j.overrides): j for j in jobs}

            def record_of(job_overrides):
                job = by_overrides.get(tuple(job_overrides))
                return None if job is None else RunStore(job.folder).read_results()

            plan.choose(record_of)
            path = plan.write(results_dir)
            for cell in plan.untunable():
                log.error("no completed selection run for %s: it is not trained further", cell)
            print(f"[sweep {name}] {self.tuning.setting} chosen on {self.tuning.metric} (seed "
                  f"{self.tuning.seed}) for {len(plan.cells) - len(plan.untunable())} of {len(plan.cells)} "
                  f"cells: {path}", flush=True)
            overrides = plan.final_jobs()
        all_jobs += self._run_phase(name, "final" if self.tuning else "", overrides, results_dir, returns,
                                    overall, later=len(followers) if self.tuning else 0)
        if self.tuning is not None and followers:  # phase 3: more jobs at their tuned cell's value
            jobs, left_out = plan.follower_jobs(followers)
            for job in left_out:
                log.error("no chosen %s for the follower %s: it is not trained", self.tuning.setting, job)
            all_jobs += self._run_phase(name, "followers", jobs, results_dir, returns, overall)

        unique: dict[tuple[str, ...], Job] = {}
        for job in all_jobs:  # a selection job is also the final job of its seed: counted once, as run
            unique.setdefault(tuple(job.overrides), job)  # (by its overrides: two jobs may share a folder)
        unique = list(unique.values())
        summary = summarize(name, unique, time.time() - started, sweep_dir)
        print(summary_text(summary, results_dir), flush=True)
        if any(f["status"] in ("failed", "lost", "refused", "locked") for f in summary["failures"]):
            sys.exit(1)  # everything that could run did; a script still learns that some jobs failed
        return returns

    def _run_phase(self, name: str, phase: str, overrides: list[list[str]], results_dir: Path,
                   returns: list[Sequence[Any]], overall: Overall | None = None, later: int = 0) -> list[Job]:
        """Plan `overrides`, launch what is missing (in batches, with retries), follow it; returns the
        planned jobs (their states and statuses updated). With `overall`, the progress line counts
        the whole sweep: the phases before, this one, and about `later` jobs of the phases after."""
        label = f"[sweep {name}{' ' + phase if phase else ''}]"
        print(f"{label} planning {len(overrides)} jobs: composing each config, reading its run folder",
              flush=True)
        jobs = plan_jobs(self.hydra_context.config_loader, self.config, overrides)
        to_run = [j for j in jobs if j.state == "run"]
        finished = sum(j.state == "finished" for j in jobs)
        invalid = sum(j.state == "invalid" for j in jobs)
        refused = [j for j in jobs if j.state == "refused"]
        launcher = type(self.launcher).__name__
        print(f"{label} {len(jobs)} jobs: {finished} already finished, {invalid} invalid cells "
              f"(recorded as skipped), {len(refused)} refused (their run folder is another run's), "
              f"{len(to_run)} to run with {launcher}; results in {results_dir}", flush=True)
        for job in refused:
            log.error("refused: %s", job.error)
        if jobs and invalid == len(jobs):  # nothing of it can run: the input is wrong, as in a single run
            raise ConfigError(f"every job of {label} is an invalid operator (recorded as skipped): "
                              f"{jobs[0].reason}")

        batch_size = self.max_batch_size or max(len(to_run), 1)
        job_idx = sum(len(r) for r in returns)
        progress = SweepProgress(f"{name} {phase}" if phase else name, jobs, self.poll_seconds,
                                 overall=overall)
        if overall is not None:
            overall.total = overall.done + len(progress.fresh_jobs()) + later
        with progress:
            for start in range(0, len(to_run), batch_size):
                pending = to_run[start:start + batch_size]
                for attempt in range(self.retries + 1):
                    batch_returns, lost = self._launch(pending, job_idx)
                    returns.append(batch_returns)
                    job_idx += len(pending)
                    pending = [job for job, _ in lost]
                    if not lost or attempt == self.retries:
                        break
                    print(f"{label} {len(lost)} job(s) ended without a record (killed or lost by "
                          f"the launcher); launching them again, they resume from their checkpoints "
                          f"(retry {attempt + 1}/{self.retries})", flush=True)
                for job, err in lost:
                    job.error = f"{type(err).__name__}: {err}"
                    record_unrunnable(job.cfg, RuntimeError(f"the job did not finish: {job.error}"))
        if overall is not None:
            overall.add(progress)
        return jobs

    def _launch(self, batch: list[Job], initial_job_idx: int) -> tuple[Sequence[Any], list]:
        """Launch one batch; return the launcher's returns and the jobs it lost: those that raised
        past `ablate.train.main` or that the launcher gave up on (a killed submitit or joblib worker)
        without writing a record in this launch. A job that failed cleanly has recorded why."""
        launched = time.time()
        try:
            with controllers_ignoring_sigint():  # submitit_local's: a Ctrl-C is their tasks' to handle
                returns = self.launcher.launch([j.overrides for j in batch], initial_job_idx=initial_job_idx)
        except BadInput:  # a request the cluster can never run: relaunching would not help
            raise
        except Exception as err:  # noqa: BLE001  e.g. submitit's UncompletedJobError
            log.error("the launcher gave up on a batch of %d jobs: %s", len(batch), err)
            returns, failures = [], {id(j): err for j in batch}
        else:
            failures = {id(j): r._return_value for j, r in zip(batch, returns)
                        if r.status == JobStatus.FAILED}
            for job, r in zip(batch, returns):  # refused at run time: the folder holds no record of it
                outcome = r.return_value if r.status == JobStatus.COMPLETED else None
                # refused (another run's folder) or locked (another job trains it: a relaunch now
                # would meet it again, so it is neither lost nor retried) at run time
                if isinstance(outcome, dict) and outcome.get("status") in ("refused", "locked"):
                    job.status, job.error = outcome["status"], outcome.get("error")
        lost = [(job, failures[id(job)]) for job in batch
                if id(job) in failures and not recorded_since(job, launched)]
        return returns, lost


def register_sweeper() -> None:
    """Make Hydra know `hydra_plugins.ablate_sweeper.GridSweeper` (and its SlurmLauncher) in an
    editable install too.

    Hydra discovers plugins by walking the `hydra_plugins` namespace on disk; an editable install
    maps the module through an import hook that the walk does not see, so register it explicitly
    (Hydra's public `Plugins.register`). In a regular install the walk finds it and this is a no-op.
    """
    from hydra.plugins.launcher import Launcher
    from hydra_plugins.ablate_sweeper import GridSweeper as PluginSweeper
    from hydra_plugins.ablate_sweeper import SlurmLauncher as PluginLauncher

    plugins = Plugins.instance()
    if PluginSweeper not in plugins.discover(Sweeper):
        plugins.register(PluginSweeper)
    if PluginLauncher not in plugins.discover(Launcher):
        plugins.register(PluginLauncher)

