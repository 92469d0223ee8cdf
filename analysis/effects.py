"""The axis-effect table: what flipping exactly one axis does to accuracy and cost, and how sure that is.

The paper's argument is made of such single flips (local MLP -> local attention is not one, it
changes spatial sharing and dynamic at once; dwconv -> dynamic dwconv is one: static ->
homogeneous). Two experiments form a pair only when every setting that differs between them belongs
to one axis (ablate.tracking.identity.AXIS_SETTINGS): the same recipe, model, data and budget. The
numeric precision is flipped the same way (`identity.FLIPS`): fp32 against bf16 of one experiment. Runs
are paired by seed, so the seed-to-seed noise of the initialisation and data order cancels in each
difference; the mean difference comes with its paired 95% t-interval and a verdict (resolved when
the interval excludes 0), and an unresolved one with the paired seeds that would resolve it.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pandas as pd

from ablate.tracking.identity import FLIPS, LABEL_SETTINGS, axis_of_setting, differing_keys
from analysis.axes import ORDER, axis_value_label, rank
from analysis.comparison import ACCURACY
from analysis.experiments import distinguishing_settings, experiments, seed_pairs
from analysis.speeds import processor_of
from analysis.stats import paired_difference
from analysis.tables import (
    experiment_columns,
    format_table,
    interval_cell,
    number_cell,
    pairs_cell,
    printed_cells,
    seeds_needed_cell,
    text_cell,
    write_table,
)

__all__ = ["EFFECT_COLUMNS", "EFFECTS_SHOWN", "EFFECTS_PRINTED", "axis_effects", "printed_effects",
           "write_axis_effects"]

EFFECT_COLUMNS = ("axis", "from", "to", "from_operator", "to_operator", "settings", "block", "model", "data",
                  "epochs", "train_size", "pairs", "unpaired", "delta_top1_mean", "delta_top1_std", "ci_low",
                  "ci_high", "p_value", "verdict", "seeds_needed", "delta_params_m", "delta_gmac",
                  "speed_ratio")
EFFECTS_SHOWN = ("from_operator", "block", "model", "data", "epochs", "train_size")


# printed header -> the numbers it shows; the checker (analysis.check) reads them back with the same cells.
EFFECTS_PRINTED = {
    "paired seeds": pairs_cell(),
    "Δtop-1 (points)": number_cell("delta_top1_mean", "+.2f"),
    "95% CI": interval_cell("ci_low", "ci_high", "pairs", "+.2f"),
    "verdict": text_cell("verdict"),
    "seeds to resolve": seeds_needed_cell(),
    "Δparams (M)": number_cell("delta_params_m", "+.3f"),
    "ΔGMAC": number_cell("delta_gmac", "+.4f"),
    "speed ratio": number_cell("speed_ratio", ".2f"),
}


def _axis_rank(axis: str, config: dict, cpg: float) -> tuple:
    """Which side of a flip is "from": the sparser, more shared, more static one; fewer channels."""
    if axis == "channels":
        return (cpg,)
    if axis == "precision":
        return rank("precision", config["settings"].get("precision", "auto"))
    if axis == "connectivity":
        kind = config["connectivity"]
        known = ORDER["connectivity"]
        return (known.index(kind) if kind in known else len(known), str(kind), config["kernel_size"] or 0,
                bool(config["shift"]))
    value = config[axis]
    known = ORDER[axis]
    return (known.index(value) if value in known else len(known), str(value))


def _flipped_axis(a: dict, b: dict) -> str | None:
    """The one axis in which two experiments differ, or None (they differ in none, in several, or in
    a setting outside the axes: a learning rate, a block, a model)."""
    axes = {axis_of_setting(k, FLIPS) for k in differing_keys(a, b) if k not in LABEL_SETTINGS}
    return axes.pop() if len(axes) == 1 and None not in axes else None


def axis_effects(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per pair of experiments that differ in exactly one axis, with paired-seed differences.

    pairs: the seeds both sides measured; unpaired: the seeds of one side only, left out (a pair of
    experiments with no seed in common is a row of 0 pairs, never dropped).
    delta_* = to - from over the paired seeds: mean, sample std, 95% t-interval (ci_low, ci_high;
    NaN for one pair), p_value (paired t-test), verdict, seeds_needed (paired seeds that resolve a
    difference of this size and spread 4 times in 5; NaN when resolved or not estimable, inf when
    never); speed_ratio = mean over pairs of to / from training samples per second (>1: faster), over
    the pairs whose two runs one processor timed (analysis.speeds).
    """
    groups = experiments(runs)
    rows, settings = [], []
    for (_, runs_a), (_, runs_b) in combinations(groups, 2):
        a, b = runs_a.iloc[0], runs_b.iloc[0]
        axis = _flipped_axis(a["settings"], b["settings"])
        if axis is None:
            continue
        ranks = [_axis_rank(axis, r, r["cpg"]) for r in (a, b)]
        (src, src_runs), (dst, dst_runs) = ((a, runs_a), (b, runs_b)) if ranks[0] <= ranks[1] else \
            ((b, runs_b), (a, runs_a))
        # a seed of one side only is left out and counted (with no seed in common, a row of 0 pairs)
        paired, s, d, unpaired = seed_pairs(src_runs, dst_runs, metric)
        difference = paired_difference((d[metric] - s[metric]).to_numpy(dtype=float))
        # a ratio of two speeds is the operators' only where one processor timed both seeds
        same = d["processor"].map(processor_of) == s["processor"].map(processor_of)
        speed = (d["train_samples_per_s"] / s["train_samples_per_s"])[same].dropna()
        rows.append({
            "axis": axis, "from": axis_value_label(axis, src), "to": axis_value_label(axis, dst),
            "from_operator": src["operator"], "to_operator": dst["operator"], "settings": "",
            **{c: src[c] for c in ("block", "model", "data", "epochs", "train_size")}, "pairs": len(paired),
            "unpaired": unpaired, "delta_top1_mean": difference.interval.mean,
            "delta_top1_std": difference.interval.std,
            "ci_low": difference.interval.low, "ci_high": difference.interval.high,
            "p_value": difference.p_value, "verdict": difference.verdict,
            "seeds_needed": difference.seeds_needed,
            # cost does not depend on the seed: the experiments' means, measured with or without pairs
            "delta_params_m": float(dst_runs["params_m"].mean() - src_runs["params_m"].mean()),
            "delta_gmac": float(dst_runs["gmac"].mean() - src_runs["gmac"].mean()),
            "speed_ratio": speed.mean() if len(speed) else float("nan"),
        })
        settings.append(src["settings"])
    table = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
    if table.empty:
        return table
    table["settings"] = distinguishing_settings(settings, {c: list(table[c]) for c in EFFECTS_SHOWN})
    axis_order = list(FLIPS)
    order = sorted(range(len(table)), key=lambda i: (
        axis_order.index(table["axis"].iloc[i]), str(table["from_operator"].iloc[i]),
        str(table["to_operator"].iloc[i]), str(table["settings"].iloc[i]),
        *(str(table[c].iloc[i]) for c in EFFECTS_SHOWN[1:])))
    return table.iloc[order].reset_index(drop=True)


def printed_effects(table: pd.DataFrame) -> pd.DataFrame:
    """The table as read in Markdown (a settings column only where pairs differ in one)."""
    columns = {"axis": lambda r: r["axis"], "from": lambda r: r["from"], "to": lambda r: r["to"],
               "from operator": lambda r: r["from_operator"], "to operator": lambda r: r["to_operator"],
               **experiment_columns(table)}
    columns.update(printed_cells(EFFECTS_PRINTED))
    return format_table(table, columns)


def write_axis_effects(runs: pd.DataFrame, out_dir: Path, metric: str = ACCURACY) -> list[Path]:
    """axis_effects.csv (full precision) and axis_effects.md in `out_dir`."""
    table = axis_effects(runs, metric)
    return write_table(table, printed_effects(table), Path(out_dir) / "axis_effects", formats=("csv", "md"))
