"""Figure 2 of Han et al.: accuracy against the number of channels that share one set of weights.

A line is one experiment with only its channel sharing varied: runs whose settings are equal except
`sharing.channels_per_group` / `sharing.groups` (and their seed). Lines of one preset that differ in
another setting (a learning rate, a shift) carry that setting in their legend label. Only lines with
at least two channel settings are curves; a store without such a sweep has no Figure 2 (the report
says so). The x value is the channels per group of the first stage (`cpg`), drawn on a log2 axis,
since the sweeps double it; the band is the 95% t-interval of the mean over seeds (none for 1 seed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ablate.tracking.identity import axis_of_setting
from analysis.axes import is_missing
from analysis.comparison import ACCURACY
from analysis.experiments import distinguishing_settings, experiments
from analysis.plotting import new_figure, save_figure
from analysis.stats import t_interval

__all__ = ["LINE_KEYS", "figure2_data", "plot_figure2"]

LINE_KEYS = ("preset", "block", "model", "data", "epochs", "train_size")  # shown in the data, per line


def _line_of(settings: dict) -> str:
    """The settings of an experiment without its channel sharing: equal for the points of one line."""
    return json.dumps({k: v for k, v in settings.items() if axis_of_setting(k) != "channels"},
                      sort_keys=True, default=str)


def figure2_data(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per (line, cpg): what the figure plots.

    Columns: line (the legend label), the line keys, cpg, top1_mean, top1_std (sample std), ci_low,
    ci_high (95% t-interval; NaN for one seed), seeds, params_m and gmac (means over the seeds), and
    the seeds' accuracies (a tuple). Empty when no line has two channel settings.
    """
    lines: dict[str, list[pd.DataFrame]] = {}
    for _, group in experiments(runs):
        if not is_missing(group["cpg"].iloc[0]):
            lines.setdefault(_line_of(group["settings"].iloc[0]), []).append(group)
    lines = {k: points for k, points in lines.items() if len({p["cpg"].iloc[0] for p in points}) >= 2}
    firsts = [points[0].iloc[0] for points in lines.values()]
    extra = distinguishing_settings([json.loads(k) for k in lines], {"preset": [r["preset"] for r in firsts]})
    records = []
    for first, more, points in zip(firsts, extra, lines.values()):
        label = f"{first['preset']} ({more})" if more else str(first["preset"])
        for point in sorted(points, key=lambda p: p["cpg"].iloc[0]):
            accuracy = t_interval(point[metric])
            records.append({"line": label, **{k: first[k] for k in LINE_KEYS},
                            "cpg": float(point["cpg"].iloc[0]),
                            "top1_mean": accuracy.mean, "top1_std": accuracy.std, "ci_low": accuracy.low,
                            "ci_high": accuracy.high, "seeds": accuracy.n,
                            "params_m": point["params_m"].mean(), "gmac": point["gmac"].mean(),
                            "values": tuple(point[metric].dropna())})
    columns = ["line", *LINE_KEYS, "cpg", "top1_mean", "top1_std", "ci_low", "ci_high", "seeds", "params_m",
               "gmac", "values"]
    return pd.DataFrame(records, columns=columns)


def plot_figure2(runs: pd.DataFrame, out_stem: Path | None = None, metric: str = ACCURACY):
    """The figure (mean line, 95% interval band where there are 2 seeds or more, faint seed points,
    params annotated), or None without a Figure-2 sweep. With `out_stem`, also written as
    <out_stem>.png and .pdf."""
    data = figure2_data(runs, metric)
    if data.empty:
        return None
    fig = new_figure((6.4, 4.4))
    ax = fig.subplots()
    for i, (label, line) in enumerate(data.groupby("line", sort=False)):
        color = f"C{i % 10}"
        x, y = line["cpg"].to_numpy(), line["top1_mean"].to_numpy()
        low, high = line["ci_low"].to_numpy(dtype=float), line["ci_high"].to_numpy(dtype=float)
        ax.plot(x, y, "o-", color=color, label=label, zorder=3)
        has_band = np.isfinite(low) & np.isfinite(high)  # one seed: no interval, so no band there
        ax.fill_between(x, np.where(has_band, low, y), np.where(has_band, high, y), where=has_band,
                        color=color, alpha=0.15, linewidth=0)
        for _, point in line.iterrows():
            ax.scatter([point["cpg"]] * len(point["values"]), point["values"], color=color, alpha=0.3, s=12,
                       zorder=2)
            if not is_missing(point["params_m"]):
                ax.annotate(f"{point['params_m']:.2f}M", (point["cpg"], point["top1_mean"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ticks = sorted(data["cpg"].unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("channels per group (first stage; log2)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title("Accuracy against channel sharing (mean, 95% interval over seeds; params annotated)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if out_stem is not None:
        save_figure(fig, Path(out_stem))
    return fig

