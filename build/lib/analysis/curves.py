"""Accuracy curves: one line per experiment with one setting varied, a point per value, over seeds.

Figure 2 (accuracy against channels per group) and the data-scale figure (accuracy against training
images) are the same picture with another setting on the x axis. A line gathers the experiments
whose settings are equal except the varied ones (and the seed); lines of one preset that differ in
another setting (a learning rate, a shift) carry that setting in their legend label. Only lines with
at least two x values are curves. The band is the 95% t-interval of the mean over seeds (none for
one seed), the seeds themselves are faint points.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from analysis.axes import is_missing
from analysis.comparison import ACCURACY
from analysis.experiments import distinguishing_settings, experiments
from analysis.plotting import new_figure, save_figure
from analysis.stats import t_interval

__all__ = ["LINE_KEYS", "curve_data", "plot_curves"]

LINE_KEYS = ("preset", "block", "model", "data", "epochs", "train_size")  # shown in the data, per line


def curve_data(runs: pd.DataFrame, varied: Callable[[str], bool], x_column: str,
               metric: str = ACCURACY) -> pd.DataFrame:
    """One row per (line, x): what a curve figure plots.

    `varied(key)` says which flattened settings the x axis varies; `x_column` is the run column with
    the x value. Columns: line (the legend label), the line keys, x, top1_mean, top1_std (sample
    std), ci_low, ci_high (95% t-interval; NaN for one seed), seeds, params_m and gmac (means over
    the seeds), and the seeds' accuracies (a tuple). Empty when no line has two x values.
    """
    def line_of(settings: dict) -> str:
        return json.dumps({k: v for k, v in settings.items() if not varied(k)}, sort_keys=True, default=str)

    lines: dict[str, list[pd.DataFrame]] = {}
    for _, group in experiments(runs):
        if not is_missing(group[x_column].iloc[0]):
            lines.setdefault(line_of(group["settings"].iloc[0]), []).append(group)
    lines = {k: points for k, points in lines.items() if len({p[x_column].iloc[0] for p in points}) >= 2}
    firsts = [points[0].iloc[0] for points in lines.values()]
    extra = distinguishing_settings([json.loads(k) for k in lines], {"preset": [r["preset"] for r in firsts]})
    records = []
    for first, more, points in zip(firsts, extra, lines.values()):
        label = f"{first['preset']} ({more})" if more else str(first["preset"])
        for point in sorted(points, key=lambda p: p[x_column].iloc[0]):
            accuracy = t_interval(point[metric])
            records.append({"line": label, **{k: first[k] for k in LINE_KEYS if k != x_column},
                            x_column: float(point[x_column].iloc[0]),
                            "top1_mean": accuracy.mean, "top1_std": accuracy.std, "ci_low": accuracy.low,
                            "ci_high": accuracy.high, "seeds": accuracy.n,
                            "params_m": point["params_m"].mean(), "gmac": point["gmac"].mean(),
                            "values": tuple(point[metric].dropna())})
    columns = ["line", *(k for k in LINE_KEYS if k != x_column), x_column, "top1_mean", "top1_std", "ci_low",
               "ci_high", "seeds", "params_m", "gmac", "values"]
    return pd.DataFrame(records, columns=columns)


def plot_curves(data: pd.DataFrame, x_column: str, xlabel: str, title: str, log_base: float = 10,
                annotate_params: bool = False, metric: str = ACCURACY, out_stem: Path | None = None):
    """Mean lines, 95% bands where there are 2 seeds or more, faint seed points (params annotated
    when asked); a log x axis. With `out_stem`, also written as <out_stem>.png and .pdf."""
    fig = new_figure((6.4, 4.4))
    ax = fig.subplots()
    for i, (label, line) in enumerate(data.groupby("line", sort=False)):
        color = f"C{i % 10}"
        x, y = line[x_column].to_numpy(), line["top1_mean"].to_numpy()
        low, high = line["ci_low"].to_numpy(dtype=float), line["ci_high"].to_numpy(dtype=float)
        ax.plot(x, y, "o-", color=color, label=label, zorder=3)
        has_band = np.isfinite(low) & np.isfinite(high)  # one seed: no interval, so no band there
        # an accuracy lies in [0, 100]: the band is drawn inside it (the CSV keeps the interval itself)
        low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
        ax.fill_between(x, np.where(has_band, low, y), np.where(has_band, high, y), where=has_band,
                        color=color, alpha=0.15, linewidth=0)
        for _, point in line.iterrows():
            ax.scatter([point[x_column]] * len(point["values"]), point["values"], color=color, alpha=0.3,
                       s=12, zorder=2)
            if annotate_params and not is_missing(point["params_m"]):
                ax.annotate(f"{point['params_m']:.2f}M", (point[x_column], point["top1_mean"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=7, color=color)
    ax.set_xscale("log", base=log_base)
    ticks = sorted(data[x_column].unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured values are labelled
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if out_stem is not None:
        save_figure(fig, Path(out_stem))
    return fig
