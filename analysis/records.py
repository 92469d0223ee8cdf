"""Run records -> one tidy pandas row per run.

The results store is the source of truth: every run folder ends with a `results.json` (completed,
failed, diverged, or a skipped grid cell). `row_from_record` is the one place that turns such a
record into a row, so the local store and the W&B mirror (`analysis.wandb_source`) give identical
tables.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.axes import AXIS_COLUMNS, is_missing

__all__ = ["COLUMNS", "NUMERIC_COLUMNS", "INTEGER_COLUMNS", "row_from_record", "runs_frame", "load_runs",
           "completed", "first_stage_channels_per_group", "group_runs"]

_DESCRIBING = ("sweep", "run", "status", "preset", "operator", "block", *AXIS_COLUMNS, "model", "data",
               "seed")
_RESULTS = ("cpg", "epochs", "epochs_done", "train_size", "val_size", "test_size", "img_size",
            "num_classes", "batch_size", "lr", "params", "params_m", "gmac", "train_samples_per_s",
            "inference_samples_per_s", "peak_memory_mb", "wall_time_s", "best_epoch",
            "best_val_top1", "best_val_top5", "best_test_top1", "best_test_top5",
            "final_val_top1", "final_val_top5", "final_test_top1", "final_test_top5")
_EXPLAINING = ("reason", "rule", "error", "git_commit", "path")

COLUMNS: tuple[str, ...] = (*_DESCRIBING, *_RESULTS, *_EXPLAINING)
INTEGER_COLUMNS = ("seed", "epochs", "epochs_done", "train_size", "val_size", "test_size", "img_size",
                   "num_classes", "batch_size", "params", "best_epoch")
NUMERIC_COLUMNS = tuple(c for c in _RESULTS if c not in INTEGER_COLUMNS)

# A throughput of 0 means "not measured" (the trainer times batches after the first one, so a test
# split of one batch gives 0): missing, not infinitely slow.
_RATES = ("train_samples_per_s", "inference_samples_per_s")


def first_stage_channels_per_group(record: Mapping[str, Any], config: Mapping[str, Any] | None = None):
    """Channels per group of the first stage: the Figure-2 x value.

    The trained model's own `stage_channels_per_group` wins; without it (a skipped cell, a W&B summary,
    which keeps scalars only) it follows from the sharing axis and, for `groups`, the stage width.
    """
    stages = record.get("stage_channels_per_group")
    if isinstance(stages, (list, tuple)) and stages:
        return float(stages[0])
    cpg, groups = record.get("channels_per_group"), record.get("groups")
    if isinstance(cpg, (list, tuple)) and cpg:
        return float(cpg[0])
    if isinstance(cpg, (int, float)) and not isinstance(cpg, bool) and not is_missing(cpg):
        return float(cpg)
    embed_dim = ((config or {}).get("model") or {}).get("embed_dim")
    if not is_missing(groups) and embed_dim:
        return float(embed_dim) / float(groups)
    return float("nan")


def row_from_record(record: Mapping[str, Any], path: str | None = None,
                    config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row (every name of COLUMNS) from a results.json record; absent fields are None.

    `config` is the run's nested config, consulted only where the record lacks a value.
    """
    row = {column: record.get(column) for column in COLUMNS}
    cpg = row["channels_per_group"]
    if isinstance(cpg, list):  # hashable, so that rows can be grouped by their axes
        row["channels_per_group"] = tuple(cpg)
    row["cpg"] = first_stage_channels_per_group(record, config)
    for rate in _RATES:
        if row[rate] is not None and not row[rate] > 0:
            row[rate] = None
    row["path"] = path if path is not None else record.get("path")
    return row


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The DataFrame of rows, with numeric columns typed and axis columns kept as given (object)."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


def _result_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .hydra/, .ipynb_checkpoints/
        if "results.json" in files:
            yield Path(root) / "results.json"


def load_runs(*folders: str | os.PathLike) -> pd.DataFrame:
    """Every run under `folders` (searched recursively, dot-folders skipped): one row per results.json.

    Raises FileNotFoundError for a folder that does not exist, so that a typo is not an empty table.
    """
    rows = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no results folder {folder}")
        for file in _result_files(folder):
            try:
                record = json.loads(file.read_text())
            except json.JSONDecodeError as err:  # written atomically, so this is not a half-written one
                raise ValueError(f"{file} is not valid JSON: {err}") from err
            rows.append(row_from_record(record, path=str(file.parent)))
    return runs_frame(rows)


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished training (what curves and tables average over)."""
    return runs[runs["status"] == "completed"].reset_index(drop=True)


def group_runs(runs: pd.DataFrame, columns) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Runs grouped by `columns`, in first-seen order, as (key values, the group's rows).

    Plain Python grouping rather than DataFrame.groupby: axis columns hold None, tuples and NaN,
    which groupby would drop or refuse; here every missing value is one key, None.
    """
    columns = list(columns)
    groups: dict[tuple, list[int]] = {}
    for i, values in enumerate(runs[columns].itertuples(index=False, name=None)):
        key = tuple(None if is_missing(v) else v for v in values)
        groups.setdefault(key, []).append(i)
    return [(dict(zip(columns, key)), runs.iloc[rows]) for key, rows in groups.items()]
