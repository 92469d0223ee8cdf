"""Run records -> one tidy pandas row per run.

The results store is the source of truth: every run folder ends with a `results.json` (completed,
failed, diverged, or a skipped grid cell). `row_from_record` is the one place that turns such a
record into a row, so the local store and the W&B mirror (`analysis.wandb_source`) give identical
tables.

Each row carries its experiment (`experiment`: the key of every setting but the seed; `settings`:
those settings, flattened), so that tables average only the seeds of one experiment. A record that
cannot be trusted (cut short, not a JSON object, changed after it was written, a missing or
mistyped field) is never half-used: it becomes a row with status `unreadable` and the reason, which
every table leaves out and the report lists.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from ablate.tasks.metrics import DETECTION_METRICS, SEGMENTATION_METRICS
from ablate.tracking.code import short
from ablate.tracking.identity import (
    effective_precision,
    experiment_key,
    experiment_of,
    flatten,
    identity_from_config,
)
from ablate.tracking.store import parse_record
from analysis.axes import AXIS_COLUMNS, is_missing
from analysis.code_versions import by_code_version
from analysis.speeds import SPEEDS

__all__ = ["COLUMNS", "NUMERIC_COLUMNS", "INTEGER_COLUMNS", "UNREADABLE", "PRIMARY", "row_from_record",
           "runs_frame", "precision_used",
           "load_runs", "read_record", "record_problems", "completed", "unreadable",
           "first_stage_channels_per_group"]

UNREADABLE = "unreadable"  # the status of a row made from a record that cannot be trusted

_DESCRIBING = ("sweep", "run", "status", "task", "preset", "operator", "block", *AXIS_COLUMNS, "model",
               "data", "seed", "experiment", "settings", "code", "pretrained_experiment")
_RESULTS = ("cpg", "epochs", "epochs_done", "train_size", "val_size", "test_size", "img_size",
            "num_classes", "batch_size", "lr", "params", "params_m", "gmac", "train_samples_per_s",
            "inference_samples_per_s", "peak_memory_mb", "wall_time_s", "best_epoch",
            "best_val_top1", "best_val_top5", "best_test_top1", "best_test_top5",
            "final_val_top1", "final_val_top5", "final_test_top1", "final_test_top5",
            # the downstream tasks' (ablate/tasks/metrics.py), on the test split after the last epoch
            *(f"final_test_{m}" for m in DETECTION_METRICS + SEGMENTATION_METRICS))
_EXPLAINING = ("reason", "rule", "error", "git_commit", "path", "code_fingerprint", "recorded_at",
               "recorded_experiment", "processor", "precision_used")

# What a record must hold to be used, and of which type: every record names its run; a completed one
# also carries what the tables and figures read. Fields of _RESULTS that are present must be numbers
# (or null: not measured).
_TEXT, _INTEGER, _NUMBER, _OBJECT = "text", "an integer", "a finite number", "an object"
_REQUIRED = {"status": _TEXT, "run": _TEXT, "preset": _TEXT, "operator": _TEXT}
_REQUIRED_COMPLETED = {"model": _TEXT, "data": _TEXT, "block": _TEXT, "seed": _INTEGER, "epochs": _INTEGER,
                       "epochs_done": _INTEGER, "params_m": _NUMBER, "gmac": _NUMBER,
                       "experiment": _TEXT, "identity": _OBJECT}
# the number every table of a task reads: a completed record of that task must hold it
PRIMARY = {"classification": "final_test_top1", "detection": "final_test_box_ap",
           "segmentation": "final_test_miou"}

COLUMNS: tuple[str, ...] = (*_DESCRIBING, *_RESULTS, *_EXPLAINING)
INTEGER_COLUMNS = ("seed", "epochs", "epochs_done", "train_size", "val_size", "test_size", "img_size",
                   "num_classes", "batch_size", "params", "best_epoch")
NUMERIC_COLUMNS = tuple(c for c in _RESULTS if c not in INTEGER_COLUMNS)



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


def _is(value: Any, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _OBJECT:
        return isinstance(value, Mapping)
    if isinstance(value, bool):  # JSON true/false are never counts or accuracies
        return False
    if kind == _INTEGER:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    # json reads NaN and Infinity as floats: a mean would skip a NaN seed silently and an inf one
    # would swamp its row, so neither is a measurement the tables can use
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def record_problems(record: Mapping[str, Any]) -> list[str]:
    """What keeps a parsed record from being used: missing keys and values of the wrong type."""
    required = dict(_REQUIRED)
    if record.get("status") == "completed":
        required.update(_REQUIRED_COMPLETED)
        task = record.get("task", "classification")
        if task not in PRIMARY:
            return [f"'task' is {task!r}, not one of {', '.join(PRIMARY)}"]
        required[PRIMARY[task]] = _NUMBER
    problems = []
    for key, kind in required.items():
        if key not in record or record[key] is None:
            problems.append(f"missing key {key!r}")
        elif not _is(record[key], kind):
            problems.append(f"{key!r} is {record[key]!r}, not {kind}")
    for key in (*NUMERIC_COLUMNS, *INTEGER_COLUMNS):  # cpg is computed here, never read from a record
        present = key not in required and key != "cpg" and record.get(key) is not None
        if present and not _is(record[key], _NUMBER):
            problems.append(f"{key!r} is {record[key]!r}, not {_NUMBER}")
    return problems


def _identity_from_config_file(folder: Path, seed: Any) -> dict[str, Any] | None:
    """The identity of a run recorded before records carried one, from the config.yaml beside it."""
    try:
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    except Exception:  # noqa: BLE001  no config, or one that does not parse: no identity
        return None
    return identity_from_config(config, seed) if isinstance(config, dict) else None


def read_record(file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a results.json the analysis can use, else (None, the reason)."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as err:
        return None, f"cannot be read: {err.strerror or err}"
    try:
        digest = (file.parent / "results.sha256").read_text().strip()
    except OSError:
        digest = None
    record, problem = parse_record(data, digest)
    if record is None:
        return None, problem
    if record.get("status") == "completed" and "identity" not in record:  # written before identities
        identity = _identity_from_config_file(file.parent, record.get("seed"))
        if identity is not None:
            record = {**record, "identity": identity, "experiment": experiment_key(identity)}
    problems = record_problems(record)
    if problems:
        return None, "; ".join(problems)
    return record, None


def row_from_record(record: Mapping[str, Any], path: str | None = None,
                    config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row (every name of COLUMNS) from a results.json record; absent fields are None.

    `config` is the run's nested config, consulted only where the record lacks a value.
    """
    row = {column: record.get(column) for column in COLUMNS}
    row["task"] = record.get("task") or "classification"  # records made before there were other tasks
    cpg = row["channels_per_group"]
    if isinstance(cpg, list):  # hashable, so that rows can be grouped by their axes
        row["channels_per_group"] = tuple(cpg)
    row["cpg"] = first_stage_channels_per_group(record, config)
    # a throughput of 0 means "not measured" (the trainer times batches after the first one, so a
    # test split of one batch gives 0): missing, not infinitely slow
    for rate in SPEEDS:
        if row[rate] is not None and not row[rate] > 0:
            row[rate] = None
    identity = record.get("identity")
    row["precision_used"] = precision_used(record)
    if isinstance(identity, Mapping):
        row["settings"] = flatten(experiment_of(identity))
        row["experiment"] = record.get("experiment") or experiment_key(identity)
    row["recorded_experiment"] = row["experiment"]  # kept as recorded whatever the code mode makes of it
    if (isinstance(identity, Mapping) and "precision" not in identity and row["precision_used"] == "bf16"
            and row["experiment"] is not None):
        # trainer.precision=auto on a GPU trains under bf16 autocast, as an explicit bf16 run does, and
        # unlike auto on a CPU (fp32). The identity cannot say so (a sweep plans a job before it knows
        # its device); the record does, so such a run is the explicit bf16 run's experiment: pooled
        # with those, never with fp32 seeds, and named where rows differ in it
        bf16 = {**experiment_of(identity), "precision": "bf16"}
        row["settings"], row["experiment"] = flatten(bf16), experiment_key(bf16)
    processes = record.get("world_size") or 1
    if processes != 1 and row["experiment"] is not None:
        # data.batch_size is per process: N processes train with N times the global batch, another
        # experiment. The identity cannot say so (a sweep plans a job without knowing its processes);
        # the record does, so such runs are grouped apart and the setting is named where rows differ
        row["settings"] = {**(row["settings"] or {}), "processes": processes}
        row["experiment"] = f"{row['experiment']}-p{processes}"
    code = record.get("code") if isinstance(record.get("code"), Mapping) else None
    row["code"], row["code_fingerprint"] = short(code), (code or {}).get("fingerprint")
    row["recorded_at"] = record.get("finished_at")
    row["path"] = path if path is not None else record.get("path")
    return row


def precision_used(record: Mapping[str, Any]) -> str | None:
    """What a run computed in (`precision_used`, bf16 or fp32); for a record made before it said so,
    its identity's explicit precision, else what `auto` gave on its device (bf16 autocast on a GPU,
    fp32 on a CPU); None where the record names no device either."""
    used = record.get("precision_used")
    if isinstance(used, str):
        return used
    identity = record.get("identity")
    if isinstance(identity, Mapping) and isinstance(identity.get("precision"), str):
        return identity["precision"]
    device = record.get("device")
    if not isinstance(device, str):
        return None
    return effective_precision(device.split(":")[0], "auto")


def _unreadable_row(file: Path, reason: str) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(status=UNREADABLE, run=file.parent.name, sweep=file.parent.parent.name, reason=reason,
               path=str(file.parent))
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


def load_runs(*folders: str | os.PathLike, code: str = "separate") -> pd.DataFrame:
    """Every run under `folders` (searched recursively, dot-folders skipped): one row per results.json.

    A record that cannot be used is a row with status `unreadable` and the reason (`reason`), left
    out of every table by `completed`. Raises FileNotFoundError for a folder that does not exist, so
    that a typo is not an empty table. `code` says what to do with seeds of one experiment made by
    different code (analysis/code_versions.py): keep them apart (default), keep the newest, or pool.
    """
    rows = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no results folder {folder}")
        for file in _result_files(folder):
            record, problem = read_record(file)
            if record is None:
                rows.append(_unreadable_row(file, problem))
                continue
            row = row_from_record(record, path=str(file.parent))
            if row["recorded_at"] is None:  # records made before they said when: the file's time
                row["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(file.stat().st_mtime))
            rows.append(row)
    return by_code_version(runs_frame(rows), code)


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished training (what curves and tables average over)."""
    return runs[runs["status"] == "completed"].reset_index(drop=True)


def unreadable(runs: pd.DataFrame) -> pd.DataFrame:
    """The records that could not be used, with their reasons."""
    return runs[runs["status"] == UNREADABLE].reset_index(drop=True)
