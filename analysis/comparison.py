"""The comparison table: one row per experiment, its accuracy averaged over seeds with a 95% interval.

Rows follow the paper's axes (connectivity, spatial sharing, dynamic, then channels per group), so
a reader walks from local MLP to local attention to (dynamic) depth-wise convolution in order. A row
is one experiment (analysis.experiments): runs are averaged only when every setting but the seed is
equal. Where rows differ in a setting no column shows (a learning rate, a batch size), the
`settings` column names it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.axes import AXIS_COLUMNS, sort_by_axes
from analysis.experiments import distinguishing_settings, experiments
from analysis.speeds import SPEEDS, mean_speed, timed_on
from analysis.stats import t_interval
from analysis.tables import (
    MISSING,
    count_cell,
    experiment_columns,
    format_table,
    interval_cell,
    number_cell,
    printed_cells,
    write_table,
)

__all__ = ["ACCURACY", "COMPARISON_KEYS", "COMPARISON_SHOWN", "COMPARISON_PRINTED", "comparison_table",
           "printed_comparison", "write_comparison"]

ACCURACY = "final_test_top1"  # the test top-1 after the last epoch: what every table and curve shows

COMPARISON_KEYS = ("preset", "operator", "block", *AXIS_COLUMNS, "model", "data", "epochs", "train_size")
# the descriptive columns the table prints (they name the settings they stand for)
COMPARISON_SHOWN = ("operator", "block", "model", "data", "epochs", "train_size")

# printed header -> the numbers it shows; the checker (analysis.check) reads them back with the same cells.
COMPARISON_PRINTED = {
    "params (M)": number_cell("params_m", ".3f"),
    "GMAC": number_cell("gmac", ".4f"),
    "train img/s": number_cell("train_samples_per_s", ".0f"),
    "inference img/s": number_cell("inference_samples_per_s", ".0f"),
    "top-1 (%)": number_cell("top1_mean", ".2f"),
    "95% CI": interval_cell("ci_low", "ci_high", "seeds", ".2f"),
    "seeds": count_cell("seeds", "seed"),
}


def comparison_table(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """The numbers, one row per experiment (completed runs that differ only in their seed).

    Columns: the keys, experiment, settings (what tells the row from the others beyond the printed
    columns), cpg, params_m, gmac, timed_on (the processor that timed the seeds: analysis.speeds),
    train/inference samples/s (means over the seeds that measured them; NaN where those were timed on
    several processors), top1_mean, top1_std (sample std), ci_low, ci_high (95% t-interval of the
    mean; NaN for one seed), seeds (distinct seeds averaged).
    """
    rows, settings = [], []
    for experiment, group in experiments(runs):
        accuracy = t_interval(group[metric])
        first = group.iloc[0]
        rows.append({**{k: first[k] for k in COMPARISON_KEYS}, "experiment": experiment, "settings": "",
                     "cpg": first["cpg"], "params_m": group["params_m"].mean(), "gmac": group["gmac"].mean(),
                     "timed_on": timed_on(group),
                     **{speed: mean_speed(group, speed) for speed in SPEEDS},
                     "top1_mean": accuracy.mean, "top1_std": accuracy.std, "ci_low": accuracy.low,
                     "ci_high": accuracy.high, "seeds": accuracy.n})
        settings.append(first["settings"])
    columns = [*COMPARISON_KEYS, "experiment", "settings", "cpg", "params_m", "gmac", "timed_on", *SPEEDS,
               "top1_mean", "top1_std", "ci_low", "ci_high", "seeds"]
    table = pd.DataFrame(rows, columns=columns)
    table["settings"] = distinguishing_settings(settings, {c: list(table[c]) for c in COMPARISON_SHOWN})
    return sort_by_axes(table, then=("operator", "settings", *COMPARISON_SHOWN[1:]))


def printed_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The table as read in Markdown and LaTeX (a settings column only where rows differ in one)."""
    columns = {"operator": lambda r: r["operator"], **experiment_columns(table)}
    for header, render in printed_cells(COMPARISON_PRINTED).items():
        if header == "train img/s" and table["timed_on"].nunique() > 1:  # speeds of unlike processors
            columns["timed on"] = lambda r: r["timed_on"] or MISSING
        columns[header] = render
    return format_table(table, columns)


def write_comparison(runs: pd.DataFrame, out_dir: Path, metric: str = ACCURACY) -> list[Path]:
    """comparison.csv (full precision), comparison.md and comparison.tex in `out_dir`."""
    table = comparison_table(runs, metric)
    return write_table(table, printed_comparison(table), Path(out_dir) / "comparison",
                       formats=("csv", "md", "tex"),
                       caption="Operators compared: params, GMAC, throughput and test top-1 "
                               "(mean over seeds, 95% t-interval of the mean).")
