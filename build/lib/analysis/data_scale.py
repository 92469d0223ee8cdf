"""The data-scale figure: accuracy against training images, a line per operator.

The paper frames weight sharing and sparse connectivity as regularizers that relax the need for
data; this is the picture that tests it. A line is one experiment with only its training-set size
varied (`data.train_subset`; the full set is the run without a subset), the x value the number of
images it trained on (`train_size`), on a log axis; bands are 95% t-intervals over seeds.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.comparison import ACCURACY
from analysis.curves import curve_data, plot_curves

__all__ = ["SIZE_SETTINGS", "data_scale_data", "plot_data_scale"]

SIZE_SETTINGS = ("data.train_subset",)  # what the x axis varies


def data_scale_data(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per (line, train_size): analysis.curves.curve_data's columns."""
    return curve_data(runs, lambda key: key in SIZE_SETTINGS, "train_size", metric)


def plot_data_scale(runs: pd.DataFrame, out_stem: Path | None = None, metric: str = ACCURACY):
    """The figure, or None without runs of one operator at two or more training-set sizes."""
    data = data_scale_data(runs, metric)
    if data.empty:
        return None
    return plot_curves(data, "train_size", "training images (log)",
                       "Accuracy against training-set size (mean, 95% interval over seeds)",
                       metric=metric, out_stem=out_stem)
