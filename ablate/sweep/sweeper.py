"""The Hydra sweeper of ablate: plan, launch what is missing, follow, summarize.

Configured by `hydra.sweeper` (conf/hydra/sweeper/grid.yaml, and the files of `sweeps/`):

    params:          overrides shared by every grid (Hydra's basic sweeper syntax: `a: 1,2,3`)
    grids:           a list of grids (each a dict like `params`); the jobs are their union
    max_batch_size:  jobs handed to the launcher at once (null: all; a launcher runs a batch in
                     parallel as far as it can)
    poll_seconds:    how often the progress line looks at the results store
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from ablate.sweep.plan import Job, expand_grids, plan_jobs
from ablate.sweep.progress import SweepProgress, summarize, summary_text
from ablate.tracking import RunStore

__all__ = ["GridSweeper", "register_sweeper"]

log = logging.getLogger("ablate.sweep")


class GridSweeper(Sweeper):
    """Hydra's basic sweeper semantics plus grid unions, skipping of finished runs and invalid cells,
    progress, and a sweep that goes on past a failed job."""

    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, Any] | None = None,
                 grids: Sequence[Mapping[str, Any]] | None = None, poll_seconds: float = 2.0):
        super().__init__()
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"hydra.sweeper.max_batch_size must be null or >= 1; got {max_batch_size}")
        self.max_batch_size, self.poll_seconds = max_batch_size, poll_seconds
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
        assert self.config is not None and self.launcher is not None
        started = time.time()
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the launchers' job lines
        name = self.config.trainer.sweep or "runs"
        results_dir = Path(self.config.trainer.results_root) / name
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        overrides = expand_grids(arguments, self.params, self.grids)
        jobs = plan_jobs(self.hydra_context.config_loader, self.config, overrides)
        to_run = [j for j in jobs if j.state == "run"]
        finished = sum(j.state == "finished" for j in jobs)
        invalid = sum(j.state == "invalid" for j in jobs)
        launcher = type(self.launcher).__name__
        print(f"[sweep {name}] {len(jobs)} jobs: {finished} already finished, {invalid} invalid cells "
              f"(recorded as skipped), {len(to_run)} to run with {launcher}; results in {results_dir}",
              flush=True)

        returns: list[Sequence[Any]] = []
        batch_size = self.max_batch_size or max(len(to_run), 1)
        with SweepProgress(name, jobs, self.poll_seconds):
            for start in range(0, len(to_run), batch_size):
                batch = to_run[start:start + batch_size]
                returns.append(self._launch(batch, initial_job_idx=start))

        summary = summarize(name, jobs, time.time() - started, sweep_dir)
        print(summary_text(summary, results_dir), flush=True)
        if any(f["status"] in ("failed", "lost") for f in summary["failures"]):
            sys.exit(1)  # everything that could run did; a script still learns that some jobs failed
        return returns

    def _launch(self, batch: list[Job], initial_job_idx: int) -> Sequence[Any]:
        """Launch one batch. A job that raised past `ablate.train.main`, or that a launcher reports
        lost (a killed submitit job), is recorded as failed in its run folder, unless it wrote its own
        record in this launch; the sweep goes on with the next batch."""
        from ablate.train import record_unrunnable

        launched = time.time()
        try:
            returns = self.launcher.launch([j.overrides for j in batch], initial_job_idx=initial_job_idx)
        except Exception as err:  # noqa: BLE001  e.g. submitit's UncompletedJobError
            log.error("the launcher gave up on a batch of %d jobs: %s", len(batch), err)
            returns, failures = [], {id(j): err for j in batch}
        else:
            failures = {id(j): r._return_value for j, r in zip(batch, returns)
                        if r.status == JobStatus.FAILED}
        for job in batch:
            err = failures.get(id(job))
            if err is None or _recorded_since(job, launched):
                continue
            job.error = f"{type(err).__name__}: {err}"
            record_unrunnable(job.cfg, RuntimeError(f"the job did not finish: {job.error}"))
        return returns


def _recorded_since(job: Job, since: float) -> bool:
    try:
        return RunStore(job.folder).results.stat().st_mtime >= since - 1.0
    except FileNotFoundError:
        return False


def register_sweeper() -> None:
    """Make Hydra know `hydra_plugins.ablate_sweeper.GridSweeper` in an editable install too.

    Hydra discovers plugins by walking the `hydra_plugins` namespace on disk; an editable install
    maps the module through an import hook that the walk does not see, so register it explicitly
    (Hydra's public `Plugins.register`). In a regular install the walk finds it and this is a no-op.
    """
    from hydra_plugins.ablate_sweeper import GridSweeper as PluginSweeper

    plugins = Plugins.instance()
    if PluginSweeper not in plugins.discover(Sweeper):
        plugins.register(PluginSweeper)

