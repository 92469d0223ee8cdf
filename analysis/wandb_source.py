"""Runs from the W&B API, as the same rows as the local store.

The results store stays the source of truth (offline W&B runs keep no readable config or summary);
this reads the online mirror when a server is reachable, e.g. for runs trained on a cluster whose
results folders are not at hand. Each run mirrors its record as:
    config   = the nested resolved Hydra config, plus flat `axes/<name>` keys (the operator's axes);
    group    = the sweep, job_type = the preset, name = the run folder's name;
    summary  = every scalar of results.json (lists, nulls and the identity are not scalars: they are
               rebuilt here from the config, with the function the trainer used), and the record's
               code as `code/fingerprint`, `code/commit`, `code/dirty`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ablate.tracking.identity import experiment_key, identity_from_config
from ablate.tracking.wandb_logger import server_problem
from analysis.axes import AXIS_COLUMNS
from analysis.records import row_from_record, runs_frame

__all__ = ["record_from_wandb", "row_from_wandb_run", "load_wandb_runs"]


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def record_from_wandb(config: Mapping[str, Any], summary: Mapping[str, Any], *, name: str | None = None,
                      group: str | None = None, job_type: str | None = None) -> dict[str, Any]:
    """A results.json-shaped record from a W&B run's config and summary.

    The summary holds the results' scalars; what it cannot hold comes from the config: the axes
    (`axes/*`, which include list-valued channels_per_group and a null groups) and the describing
    fields, should a summary be missing (a run that is still going).
    """
    record = {k: v for k, v in summary.items() if not k.startswith(("_", "code/"))}  # _runtime, _step, _wandb
    code = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("code/")}
    if code:  # the record's `code` object, kept in the summary as flat scalars
        record["code"] = {"fingerprint": None, "commit": None, "dirty": None, **code}
    for axis in AXIS_COLUMNS:
        if f"axes/{axis}" in config:
            record[axis] = config[f"axes/{axis}"]
    fallbacks = {"preset": job_type if job_type is not None else _get(config, "preset"),
                 "sweep": group if group is not None else _get(config, "trainer.sweep"),
                 "run": name, "block": _get(config, "block.style"), "model": _get(config, "model.size"),
                 "data": _get(config, "data.name"), "seed": _get(config, "trainer.seed"),
                 "epochs": _get(config, "schedule.epochs"), "img_size": _get(config, "data.img_size"),
                 "num_classes": _get(config, "data.num_classes"),
                 "batch_size": _get(config, "data.batch_size")}
    for key, value in fallbacks.items():
        if record.get(key) is None and value is not None:
            record[key] = value
    if "identity" not in record and _get(config, "preset") is not None:
        nested = {k: v for k, v in config.items() if "/" not in k}  # not the flat axes/* copies
        record["identity"] = identity_from_config(nested, record.get("seed"))
        record.setdefault("experiment", experiment_key(record["identity"]))
    return record


def row_from_wandb_run(run: Any) -> dict[str, Any]:
    """One row (analysis.records.COLUMNS) of a `wandb.apis.public.Run` (or anything with its
    `config`, `summary`, `name`, `group`, `job_type` and `url`)."""
    config = dict(run.config)
    summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
    record = record_from_wandb(config, summary, name=run.name, group=run.group, job_type=run.job_type)
    return row_from_record(record, path=getattr(run, "url", None), config=config)


def load_wandb_runs(project: str, entity: str | None = None, sweep: str | None = None) -> pd.DataFrame:
    """The runs of a W&B project (of one sweep: its group) as analysis.records rows.

    Needs a reachable server and an API key (`wandb login`); `path` holds each run's URL. Raises
    ConnectionError, naming the server, where none answers: asked first, since wandb.Api() would wait
    about 30 s and then blame the credentials.
    """
    import wandb  # only here: the local analysis does not need W&B

    problem = server_problem()
    if problem:
        raise ConnectionError(f"cannot read runs from W&B: {problem}. Set WANDB_BASE_URL to a server that "
                              "answers, or read the results folders themselves: analysis.load_runs(...)")
    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": sweep} if sweep else None
    return runs_frame([row_from_wandb_run(run) for run in api.runs(path, filters=filters)])
