"""Fair tuning: every operator at its own learning rate, chosen on the validation split.

One learning rate for every operator measures the rate as much as the operator. With
`hydra.sweeper.tune` a sweep runs in two phases:

1. **selection**: every cell of the grid (a job without its seed) at each value of the tuned
   setting, with one seed (`tune.seed`);
2. **final**: every cell at the value whose run scored best on `tune.metric` (a validation number:
   the test split is never looked at to choose), with every seed of the grid. The selection run at
   the chosen value is the final run of that seed: it is not trained twice.

3. **followers** (optional, `tune.followers: {by: [operator], grids: [...]}`): more jobs that are not
   tuned themselves but take the value chosen for the tuned cell they share the `by` settings with,
   e.g. a Figure-2 sweep or a data-scale sweep of each operator at that operator's chosen rate. A
   follower that is also a final job (the same settings) is the same run: it is not trained twice.

A value whose run failed or diverged (a rate too high) scores -inf; a cell without any completed
selection run is not trained further and is reported. The choice is a function of the records, so a
relaunched sweep makes the same choice and trains only what is missing. `tuning.json` in the sweep's
results folder records every candidate, its score and the choice, for the report's selection curves.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.errors import ConfigError
from ablate.tracking.tuning import write_tuning

__all__ = ["Tuning", "METRICS", "parse_tuning", "TuningPlan"]

METRICS = ("final_val_top1", "best_val_top1")  # validation numbers only: choosing on test would leak it
SEED = "trainer.seed"


@dataclass(frozen=True)
class Tuning:
    setting: str
    values: tuple[Any, ...]
    seed: int = 0
    metric: str = "final_val_top1"
    follow_by: tuple[str, ...] = ()  # the settings a follower shares with the tuned cell it follows
    follow_grids: tuple[dict[str, Any], ...] = ()  # the followers' grids (like hydra.sweeper.grids)


def _parse_followers(followers: Any, setting: str) -> tuple[tuple[str, ...], tuple[dict[str, Any], ...]]:
    if followers is None:
        return (), ()
    where = "hydra.sweeper.tune.followers"
    if not isinstance(followers, Mapping) or set(followers) - {"by", "grids"}:
        raise ConfigError(f"{where} must be a mapping with `by` (settings) and `grids` (a list of grids); "
                         f"got {followers!r}")
    by = followers.get("by")
    by = [by] if isinstance(by, str) else by
    if not isinstance(by, Sequence) or not by or not all(isinstance(k, str) and k for k in by):
        raise ConfigError(f"{where}.by must name the settings a follower shares with its tuned cell (e.g. "
                         f"[operator]); got {followers.get('by')!r}")
    grids = followers.get("grids")
    if not isinstance(grids, Sequence) or isinstance(grids, str) or not grids \
            or not all(isinstance(g, Mapping) for g in grids):
        raise ConfigError(f"{where}.grids must be a list of grids (mappings of setting: values); "
                         f"got {grids!r}")
    for grid in grids:
        missing = [k for k in by if k not in grid]
        if missing or setting in grid:
            raise ConfigError(f"{where}: every grid sets {', '.join(by)} (to find its tuned cell) and never "
                             f"{setting} (it follows the choice); got {dict(grid)!r}")
    return tuple(by), tuple(dict(g) for g in grids)


def parse_tuning(tune: Mapping[str, Any] | None) -> Tuning | None:
    """`hydra.sweeper.tune` as a Tuning (None: no tuning); raises ValueError naming the key."""
    if tune is None:
        return None
    if not isinstance(tune, Mapping):
        raise ConfigError("hydra.sweeper.tune must be a mapping (setting, values, seed, metric); "
                         f"got {tune!r}")
    unknown = set(tune) - {"setting", "values", "seed", "metric", "followers"}
    if unknown:
        raise ConfigError(f"hydra.sweeper.tune: unknown key(s) {', '.join(sorted(unknown))}; it takes "
                         "setting, values, seed, metric, followers")
    setting = tune.get("setting", "optim.lr")
    if not isinstance(setting, str) or not setting or setting == SEED:
        raise ConfigError(f"hydra.sweeper.tune.setting must name a setting other than the seed (e.g. "
                         f"optim.lr); got {setting!r}")
    values = tune.get("values")
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    if not isinstance(values, Sequence) or len(values) < 2 or len(set(map(str, values))) != len(values):
        raise ConfigError(f"hydra.sweeper.tune.values must list at least two different values of {setting}; "
                         f"got {values!r}")
    seed = tune.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"hydra.sweeper.tune.seed must be an integer (the selection seed); got {seed!r}")
    metric = tune.get("metric", "final_val_top1")
    if metric not in METRICS:
        raise ConfigError(f"hydra.sweeper.tune.metric must be one of {', '.join(METRICS)} (a validation "
                         f"number); got {metric!r}")
    return Tuning(setting, tuple(values), seed, metric, *_parse_followers(tune.get("followers"), setting))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class _Cell:
    overrides: tuple[str, ...]          # the job without its seed
    seeds: list[str | None]             # the seed overrides of its jobs (None: the config's default)
    chosen: Any = None
    candidates: list[dict[str, Any]] | None = None


class TuningPlan:
    """The two phases of a tuned sweep over the jobs (override lists) of its grid."""

    def __init__(self, tuning: Tuning, jobs: Sequence[Sequence[str]]):
        self.tuning = tuning
        self.cells: dict[tuple[str, ...], _Cell] = {}
        for job in jobs:
            if any(_key(o) == tuning.setting for o in job):
                raise ConfigError(f"{tuning.setting} is chosen by hydra.sweeper.tune for every cell; leave "
                                  "it out of the grid and the command line (or set tune: null)")
            seed = next((o for o in job if _key(o) == SEED), None)
            cell = tuple(o for o in job if _key(o) != SEED)
            entry = self.cells.setdefault(cell, _Cell(cell, []))
            if seed not in entry.seeds:
                entry.seeds.append(seed)

    def _with(self, cell: _Cell, value: Any, seed: str | None) -> list[str]:
        return [*cell.overrides, f"{self.tuning.setting}={value}", *([seed] if seed else [])]

    def selection_jobs(self) -> list[list[str]]:
        """Every cell at every value, with the selection seed."""
        seed = f"{SEED}={self.tuning.seed}"
        return [self._with(c, v, seed) for c in self.cells.values() for v in self.tuning.values]

    def choose(self, record_of: Callable[[list[str]], Mapping[str, Any] | None]) -> None:
        """Pick each cell's value from the selection runs' records (`record_of(job overrides)`)."""
        seed = f"{SEED}={self.tuning.seed}"
        for cell in self.cells.values():
            cell.candidates, best = [], -math.inf
            cell.chosen = None
            for value in self.tuning.values:
                record = record_of(self._with(cell, value, seed)) or {}
                score = record.get(self.tuning.metric) if record.get("status") == "completed" else None
                score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
                cell.candidates.append({"value": value, "status": record.get("status", "missing"),
                                        "run": record.get("run"), "experiment": record.get("experiment"),
                                        "score": score})
                if score is not None and score > best:  # ties keep the earlier value
                    best, cell.chosen = score, value

    def final_jobs(self) -> list[list[str]]:
        """Every cell with a chosen value, at that value, with every seed of the grid."""
        return [self._with(c, c.chosen, s) for c in self.cells.values() if c.chosen is not None
                for s in c.seeds]

    def follower_jobs(self, jobs: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[str]]:
        """The followers' jobs at the value chosen for the tuned cell with the same `follow_by`
        settings, and the followers left out (their cell has no choice), as text."""
        by = self.tuning.follow_by

        def shared(overrides: Sequence[str]) -> tuple[str, ...] | None:
            found = {_key(o): o for o in overrides}
            return tuple(found[k] for k in by) if all(k in found for k in by) else None

        chosen: dict[tuple[str, ...], Any] = {}
        for cell in self.cells.values():
            key = shared(cell.overrides)
            if key is None:
                raise ConfigError(f"hydra.sweeper.tune.followers.by: the tuned cell "
                                 f"{' '.join(cell.overrides)} does not set {', '.join(by)}")
            if key in chosen and chosen[key] != cell.chosen:
                raise ConfigError(f"hydra.sweeper.tune.followers.by: several tuned cells share "
                                 f"{' '.join(key)} with different choices; add the settings that tell them "
                                 "apart to `by`")
            chosen[key] = cell.chosen
        out, left_out = [], []
        for job in jobs:
            key = shared(job)
            if key not in chosen:
                raise ConfigError(f"hydra.sweeper.tune.followers: no tuned cell has {' '.join(key or ())}: "
                                 "add it to the tuned grid, or drop the follower")
            if chosen[key] is None:
                left_out.append(" ".join(job))
            else:
                out.append([*job, f"{self.tuning.setting}={chosen[key]}"])
        return out, left_out

    def new_final_jobs(self) -> int:
        """The final jobs that are not selection runs, before any value is chosen (for an ETA)."""
        selection_seed = f"{SEED}={self.tuning.seed}"
        return sum(s != selection_seed for c in self.cells.values() for s in c.seeds)

    def untunable(self) -> list[str]:
        return [" ".join(c.overrides) or "(the defaults)" for c in self.cells.values() if c.chosen is None]

    def write(self, results_dir: Path) -> Path:
        """tuning.json: the tuned setting, metric, seed, values, and per cell its candidates and choice."""
        shared = set.intersection(*(set(c.overrides) for c in self.cells.values())) if len(self.cells) > 1 \
            else set()

        def label(cell: _Cell) -> str:  # what tells the cells apart
            return " ".join(o for o in cell.overrides if o not in shared) or "(every job)"

        cells = [{"overrides": list(c.overrides), "label": label(c),
                  "candidates": c.candidates, "chosen": c.chosen,
                  "chosen_experiment": next((x["experiment"] for x in c.candidates or []
                                             if x["value"] == c.chosen), None)}
                 for c in self.cells.values()]
        data = {"setting": self.tuning.setting, "metric": self.tuning.metric, "seed": self.tuning.seed,
                "values": list(self.tuning.values), "cells": cells}
        return write_tuning(results_dir, data)
