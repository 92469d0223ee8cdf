"""Sweeps: grids of operator variants that Hydra launches and that survive kills and failures.

A sweep's lifecycle (pycls): **plan** every job of the grid (compose its config, find its run folder,
skip what is finished, record invalid cells as skipped), **launch** the rest through any Hydra
launcher, follow their **progress** in the results store, and end with a **summary**. The results
store is the only state: a re-launch plans again and finds what is missing.

    python -m ablate.train -m sweeps=demo                      # a named grid of sweeps/
    python -m ablate.train -m operator=dwconv,local_mlp trainer.seed=0,1 launcher=joblib
"""
from ablate.sweep.plan import Job, expand_grids, plan_jobs
from ablate.sweep.progress import SweepProgress, summarize
from ablate.sweep.sweeper import GridSweeper, register_sweeper

__all__ = ["GridSweeper", "Job", "SweepProgress", "expand_grids", "plan_jobs", "register_sweeper",
           "summarize"]
