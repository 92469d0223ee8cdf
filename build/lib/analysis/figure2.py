"""Figure 2 of Han et al.: accuracy against the number of channels that share one set of weights.

A line is one experiment with only its channel sharing varied: runs whose settings are equal except
`sharing.channels_per_group` / `sharing.groups` (and their seed); analysis/curves.py draws it. A
store without such a sweep has no Figure 2 (the report says so). The x value is the channels per
group of the first stage (`cpg`), drawn on a log2 axis, since the sweeps double it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ablate.tracking.identity import axis_of_setting
from analysis.comparison import ACCURACY
from analysis.curves import LINE_KEYS, curve_data, plot_curves

__all__ = ["LINE_KEYS", "figure2_data", "plot_figure2"]


def figure2_data(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per (line, cpg): what the figure plots (analysis.curves.curve_data's columns)."""
    return curve_data(runs, lambda key: axis_of_setting(key) == "channels", "cpg", metric)


def plot_figure2(runs: pd.DataFrame, out_stem: Path | None = None, metric: str = ACCURACY):
    """The figure (params annotated), or None without a Figure-2 sweep. With `out_stem`, also written
    as <out_stem>.png and .pdf."""
    data = figure2_data(runs, metric)
    if data.empty:
        return None
    return plot_curves(data, "cpg", "channels per group (first stage; log2)",
                       "Accuracy against channel sharing (mean, 95% interval over seeds; params annotated)",
                       log_base=2, annotate_params=True, metric=metric, out_stem=out_stem)
