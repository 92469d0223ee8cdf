"""Throughput belongs to the processor that measured it: speeds are averaged and compared per processor.

A run's accuracy is a property of its experiment (the same on any machine, up to the seeds' spread);
its images per second are a property of the experiment and of the processor that timed it: a GPU
against a CPU, an H100 against an H200, a CPU with AVX-512 against one with AVX2 or 2 threads against
16. Every record names its processor (`processor`, ablate/distributed.py: the GPU's name, or the CPU's
model, instruction set and threads). So:

- an experiment's speed is the mean over its seeds only where they were all timed on one processor;
  seeds timed on several have no speed (NaN), and the table says so rather than print a mean of
  unlike machines;
- a speed ratio (the effect table's) is taken over the seed pairs timed on one processor;
- rows timed on different processors are comparable in accuracy, not in speed: the comparison table
  prints a `timed on` column wherever its rows differ in it, and the cost plot draws one throughput
  front per processor.

Records made before they named a processor are `unrecorded`: one unknown machine, as every such
store was read before (nothing changes for a store that holds only those).
"""
from __future__ import annotations

import pandas as pd

from analysis.axes import is_missing

__all__ = ["UNRECORDED", "processor_of", "timed_on", "mean_speed", "SPEEDS"]

UNRECORDED = "unrecorded"
SPEEDS = ("train_samples_per_s", "inference_samples_per_s")


def processor_of(value) -> str:
    """A row's processor, `unrecorded` where its record names none."""
    return UNRECORDED if is_missing(value) or value == "" else str(value)


def _timed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs[list(SPEEDS)].notna().any(axis=1)]


def timed_on(runs: pd.DataFrame) -> str:
    """The processor that timed these runs ("" where none measured a speed), or "N processors"."""
    names = sorted({processor_of(p) for p in _timed(runs)["processor"]})
    if len(names) > 1:
        return f"{len(names)} processors"
    return names[0] if names else ""


def mean_speed(runs: pd.DataFrame, column: str) -> float:
    """The mean of `column` over the runs that measured it, NaN where they were timed on several
    processors (no mean of unlike machines) or where none measured it."""
    measured = runs[runs[column].notna()]
    if measured.empty or measured["processor"].map(processor_of).nunique() > 1:
        return float("nan")
    return float(measured[column].mean())
