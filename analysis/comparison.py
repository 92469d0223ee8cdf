"""The comparison table: one row per operator x model x data, averaged over seeds.

Rows follow the paper's axes (connectivity, spatial sharing, dynamic, then channels per group), so
a reader walks from local MLP to local attention to (dynamic) depth-wise convolution in order. Runs
are only averaged when everything but the seed is equal: the same operator (its label names every
overridden axis and a non-default block), model, data, epochs and training-set size.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.axes import AXIS_COLUMNS, sort_by_axes
from analysis.records import completed, group_runs
from analysis.tables import fmt, format_table, mean_std, write_table

__all__ = ["ACCURACY", "COMPARISON_KEYS", "COMPARISON_PRINTED", "comparison_table", "printed_comparison",
           "write_comparison"]

ACCURACY = "final_test_top1"  # the test top-1 after the last epoch: what every table and curve shows

COMPARISON_KEYS = ("preset", "operator", "block", *AXIS_COLUMNS, "model", "data", "epochs", "train_size")

# printed header -> (numbers column, format); the checker (analysis.check) reads the same map.
COMPARISON_PRINTED = {
    "params (M)": ("params_m", ".3f"),
    "GMAC": ("gmac", ".4f"),
    "train img/s": ("train_samples_per_s", ".0f"),
    "inference img/s": ("inference_samples_per_s", ".0f"),
    "top-1 (%)": ("top1_mean", ".2f"),  # printed with top1_std as "mean ± std"
    "seeds": ("seeds", "d"),
}


def comparison_table(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """The numbers, one row per group of completed runs that differ only in their seed.

    Columns: the keys, cpg, params_m, gmac, train/inference samples/s (means over seeds that
    measured them), top1_mean, top1_std (sample std, NaN for one seed), seeds (runs averaged).
    """
    rows = []
    for key, group in group_runs(completed(runs), COMPARISON_KEYS):
        accuracy = group[metric].dropna()
        rows.append({**key, "cpg": group["cpg"].iloc[0],
                     "params_m": group["params_m"].mean(), "gmac": group["gmac"].mean(),
                     "train_samples_per_s": group["train_samples_per_s"].mean(),
                     "inference_samples_per_s": group["inference_samples_per_s"].mean(),
                     "top1_mean": accuracy.mean() if len(accuracy) else float("nan"),
                     "top1_std": accuracy.std(ddof=1) if len(accuracy) > 1 else float("nan"),
                     "seeds": len(group)})
    columns = [*COMPARISON_KEYS, "cpg", "params_m", "gmac", "train_samples_per_s",
               "inference_samples_per_s", "top1_mean", "top1_std", "seeds"]
    table = pd.DataFrame(rows, columns=columns)
    return sort_by_axes(table, then=("operator", "block", "model", "data", "epochs", "train_size"))


def printed_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The table as read in Markdown and LaTeX."""
    columns = {"operator": lambda r: r["operator"], "block": lambda r: r["block"],
               "model": lambda r: r["model"], "data": lambda r: r["data"],
               "epochs": lambda r: fmt(r["epochs"], "d"), "train images": lambda r: fmt(r["train_size"], "d")}
    for header, (column, spec) in COMPARISON_PRINTED.items():
        if column == "top1_mean":
            columns[header] = lambda r: mean_std(r["top1_mean"], r["top1_std"], ".2f")
        else:
            columns[header] = lambda r, c=column, s=spec: fmt(r[c], s)
    return format_table(table, columns)


def write_comparison(runs: pd.DataFrame, out_dir: Path, metric: str = ACCURACY) -> list[Path]:
    """comparison.csv (full precision), comparison.md and comparison.tex in `out_dir`."""
    table = comparison_table(runs, metric)
    return write_table(table, printed_comparison(table), Path(out_dir) / "comparison",
                       formats=("csv", "md", "tex"),
                       caption="Operators compared: params, GMAC, throughput and test top-1 "
                               "(mean ± std over seeds).")
