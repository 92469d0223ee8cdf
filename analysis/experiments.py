"""Experiments: the runs that differ only in their seed, and the settings that tell experiments apart.

Every table and figure averages the seeds of one experiment and nothing else: runs are grouped by
the experiment key of their records (ablate/tracking/identity.py), never by a hand-picked list of
columns, so a learning rate, a batch size or a warm-up that differs makes another row, not another
"seed". Where the rows of a table (or the lines of a figure) differ in settings that no column of
the table shows, `distinguishing_settings` names exactly those settings for each row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ablate.tracking.identity import LATER_DEFAULTS, matches_setting
from analysis.axes import is_missing
from analysis.records import completed

__all__ = ["EXPLAINED_BY", "experiments", "one_run_per_seed", "seed_pairs", "distinguishing_settings",
           "setting_text"]

# The settings a descriptive column of a table stands for. A setting that differs between rows is
# left unsaid only when such a column shows it: its value is the same for every row with the same
# value of the column (the operator's label names every axis it changes, a model name its widths
# and depths, ...). Everything else that differs, the recipe above all, is printed.
_OPERATOR = ("preset", "connectivity.", "sharing.", "dynamic.", "block.")
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    "operator": _OPERATOR, "preset": _OPERATOR, "from_operator": _OPERATOR, "block": ("block.",),
    "model": ("model.",), "data": ("data.",), "epochs": ("schedule.epochs",),
    # a downstream run's task names its head too (conf/head follows conf/task)
    "task": ("task.name", "head."),
    "train_size": ("data.train_subset", "data.val_size"),
}


def one_run_per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """One run per seed (the first by folder, should the same run lie in two sweeps' folders):
    a seed counts once, however often it was recorded."""
    rows = rows.sort_values("path", key=lambda s: s.astype(str), kind="stable")
    return rows.drop_duplicates("seed", keep="first")


def experiments(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The completed runs grouped by experiment, in first-seen order, one run per seed in each."""
    done = completed(runs)
    # a flag per row, as a Series: an empty list (no completed run) would select no columns
    done = done[done["experiment"].map(lambda e: not is_missing(e)).astype(bool)]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(done["experiment"]):
        groups.setdefault(key, []).append(i)
    return [(key, one_run_per_seed(done.iloc[rows])) for key, rows in groups.items()]


def seed_pairs(src: pd.DataFrame, dst: pd.DataFrame, column: str
               ) -> tuple[list[Any], pd.DataFrame, pd.DataFrame, int]:
    """Two experiments' runs paired by seed: (the seeds both measured `column` for, src's and dst's
    runs at those seeds (indexed by seed), how many seeds only one side measured).

    A seed of one side only has nothing to be paired with: it is left out of the difference, and the
    count says so, since a table that pairs 2 of 3 seeds must not read as a 2-seed experiment."""
    measured = [side[side[column].notna()].set_index("seed") for side in (src, dst)]
    a, b = (set(side.index) for side in measured)
    paired = sorted(a & b)
    return paired, measured[0].loc[paired], measured[1].loc[paired], len(a ^ b)


def setting_text(key: str, value: Any) -> str:
    """"optim.lr=0.0001", "model.depths=[1,1,3,1]", "data.train_subset=null"."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, tuple):
        text = "[" + ",".join(setting_text("", v)[1:] for v in value) + "]"
    else:
        text = str(value)
    return f"{key}={text}"


def distinguishing_settings(settings: Sequence[Mapping[str, Any]],
                            shown: Mapping[str, Sequence[Any]] | None = None) -> list[str]:
    """For each row, "key=value, ..." of the settings that differ across the rows and that no shown
    column stands for (EXPLAINED_BY); "" where the rows differ in nothing else.

    `settings` are the rows' flattened experiment settings; `shown` maps a column the table prints to
    its value in each row.
    """
    shown = dict(shown or {})
    # a setting added after a row's run was recorded had its default value there (cosine decay)
    settings = [{**LATER_DEFAULTS, **s} for s in settings]
    missing = object()
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({repr(s.get(k, missing)) for s in settings}) > 1]

    def explained(key: str) -> bool:
        for column, values in shown.items():
            if not matches_setting(key, EXPLAINED_BY.get(column, ())):
                continue
            seen: dict[str, str] = {}
            if all(seen.setdefault(str(v), repr(s.get(key, missing))) == repr(s.get(key, missing))
                   for v, s in zip(values, settings)):
                return True
        return False

    printed = [k for k in varying if not explained(k)]
    return [", ".join(setting_text(k, s.get(k)) for k in printed if k in s) for s in settings]
