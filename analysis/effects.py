"""The axis-effect table: what flipping exactly one axis does to accuracy and cost.

The paper's argument is made of such single flips (local MLP -> local attention is not one, it
changes spatial sharing and dynamic at once; dwconv -> dynamic dwconv is one: static ->
homogeneous). Two operators are compared only when everything else is equal (the other axes,
block, model, data, epochs, training-set size), and runs are paired by seed, so the seed-to-seed
noise of the initialisation and data order cancels in each difference.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pandas as pd

from analysis.axes import AXIS_COLUMNS, AXIS_GROUPS, EXPERIMENT_COLUMNS, ORDER, axis_value_label, is_missing
from analysis.comparison import ACCURACY
from analysis.records import completed, group_runs
from analysis.tables import fmt, format_table, mean_std, write_table

__all__ = ["EFFECT_COLUMNS", "EFFECTS_PRINTED", "axis_effects", "printed_effects", "write_axis_effects"]

EFFECT_COLUMNS = ("axis", "from", "to", "from_operator", "to_operator", "block", "model", "data", "epochs",
                  "train_size", "pairs", "delta_top1_mean", "delta_top1_std", "delta_params_m",
                  "delta_gmac", "speed_ratio")

# printed header -> (numbers column, format); the checker (analysis.check) reads the same map.
EFFECTS_PRINTED = {
    "pairs": ("pairs", "d"),
    "Δtop-1 (points)": ("delta_top1_mean", "+.2f"),  # with delta_top1_std as "mean ± std"
    "Δparams (M)": ("delta_params_m", "+.3f"),
    "ΔGMAC": ("delta_gmac", "+.4f"),
    "speed ratio": ("speed_ratio", ".2f"),
}


def _axis_rank(axis: str, config: dict, cpg: float) -> tuple:
    """Which side of a flip is "from": the sparser, more shared, more static one; fewer channels."""
    if axis == "channels":
        return (cpg,)
    if axis == "connectivity":
        kind = config["connectivity"]
        known = ORDER["connectivity"]
        return (known.index(kind) if kind in known else len(known), str(kind), config["kernel_size"] or 0,
                bool(config["shift"]))
    value = config[axis]
    known = ORDER[axis]
    return (known.index(value) if value in known else len(known), str(value))


def _by_seed(rows: pd.DataFrame) -> dict[int, pd.Series]:
    """One run per seed (the first found, should a seed be in two sweeps)."""
    seeds: dict[int, pd.Series] = {}
    for _, row in rows.iterrows():
        if not is_missing(row["seed"]):
            seeds.setdefault(int(row["seed"]), row)
    return seeds


def axis_effects(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per pair of operators that differ in exactly one axis, with paired-seed differences.

    delta_* = to - from, averaged over the paired seeds (std: sample std, NaN for one pair);
    speed_ratio = mean over pairs of to / from training samples per second (>1: faster).
    """
    configs = group_runs(completed(runs), (*AXIS_COLUMNS, *EXPERIMENT_COLUMNS))
    rows = []
    for (a, runs_a), (b, runs_b) in combinations(configs, 2):
        if any(a[c] != b[c] for c in EXPERIMENT_COLUMNS):
            continue
        flipped = [axis for axis, cols in AXIS_GROUPS.items() if any(a[c] != b[c] for c in cols)]
        if len(flipped) != 1:
            continue
        axis = flipped[0]
        ranks = [_axis_rank(axis, c, r["cpg"].iloc[0]) for c, r in ((a, runs_a), (b, runs_b))]
        (src, src_runs), (dst, dst_runs) = ((a, runs_a), (b, runs_b)) if ranks[0] <= ranks[1] else \
            ((b, runs_b), (a, runs_a))
        src_seeds, dst_seeds = _by_seed(src_runs), _by_seed(dst_runs)
        paired = sorted(set(src_seeds) & set(dst_seeds))
        if not paired:
            continue  # no seed in common: nothing to pair
        pairs = [(src_seeds[s], dst_seeds[s]) for s in paired]
        delta = pd.Series([d[metric] - s[metric] for s, d in pairs], dtype=float).dropna()
        speed = pd.Series([d["train_samples_per_s"] / s["train_samples_per_s"] for s, d in pairs],
                          dtype=float).dropna()
        rows.append({
            "axis": axis, "from": axis_value_label(axis, src), "to": axis_value_label(axis, dst),
            "from_operator": src_runs["operator"].iloc[0], "to_operator": dst_runs["operator"].iloc[0],
            **{c: src[c] for c in EXPERIMENT_COLUMNS}, "pairs": len(pairs),
            "delta_top1_mean": delta.mean() if len(delta) else float("nan"),
            "delta_top1_std": delta.std(ddof=1) if len(delta) > 1 else float("nan"),
            "delta_params_m": sum(d["params_m"] - s["params_m"] for s, d in pairs) / len(pairs),
            "delta_gmac": sum(d["gmac"] - s["gmac"] for s, d in pairs) / len(pairs),
            "speed_ratio": speed.mean() if len(speed) else float("nan"),
        })
    table = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
    if table.empty:
        return table
    axis_order = list(AXIS_GROUPS)
    order = sorted(range(len(table)), key=lambda i: (
        axis_order.index(table["axis"].iloc[i]), str(table["from_operator"].iloc[i]),
        str(table["to_operator"].iloc[i]), *(str(table[c].iloc[i]) for c in EXPERIMENT_COLUMNS)))
    return table.iloc[order].reset_index(drop=True)


def printed_effects(table: pd.DataFrame) -> pd.DataFrame:
    """The table as read in Markdown."""
    columns = {"axis": lambda r: r["axis"], "from": lambda r: r["from"], "to": lambda r: r["to"],
               "from operator": lambda r: r["from_operator"], "to operator": lambda r: r["to_operator"],
               "block": lambda r: r["block"], "model": lambda r: r["model"], "data": lambda r: r["data"],
               "epochs": lambda r: fmt(r["epochs"], "d"), "train images": lambda r: fmt(r["train_size"], "d")}
    for header, (column, spec) in EFFECTS_PRINTED.items():
        if column == "delta_top1_mean":
            columns[header] = lambda r: mean_std(r["delta_top1_mean"], r["delta_top1_std"], "+.2f", ".2f")
        else:
            columns[header] = lambda r, c=column, s=spec: fmt(r[c], s)
    return format_table(table, columns)


def write_axis_effects(runs: pd.DataFrame, out_dir: Path, metric: str = ACCURACY) -> list[Path]:
    """axis_effects.csv (full precision) and axis_effects.md in `out_dir`."""
    table = axis_effects(runs, metric)
    return write_table(table, printed_effects(table), Path(out_dir) / "axis_effects", formats=("csv", "md"))
