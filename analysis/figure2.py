"""Figure 2 of Han et al.: accuracy against the number of channels that share one set of weights.

A line is one operator with only its channel sharing varied: runs grouped by preset, every axis but
the channel-sharing ones, block, model, data and the training budget. Only lines with at least two
channel settings are curves; a store without such a sweep has no Figure 2 (the report says so).
The x value is the channels per group of the first stage (`cpg`), drawn on a log2 axis, since the
sweeps double it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.axes import AXIS_GROUPS, EXPERIMENT_COLUMNS, is_missing
from analysis.comparison import ACCURACY
from analysis.plotting import new_figure, save_figure
from analysis.records import completed, group_runs

__all__ = ["LINE_KEYS", "figure2_data", "plot_figure2"]

LINE_KEYS = ("preset", *(c for axis, cols in AXIS_GROUPS.items() if axis != "channels" for c in cols),
             *EXPERIMENT_COLUMNS)


def _line_labels(keys: list[dict]) -> list[str]:
    """The preset name, plus the key values that tell lines of the same preset apart."""
    labels = []
    for key in keys:
        same = [k for k in keys if k["preset"] == key["preset"]]
        differing = [c for c in LINE_KEYS[1:] if len({str(k[c]) for k in same}) > 1]
        extra = ", ".join(f"{c}={key[c]}" for c in differing)
        labels.append(f"{key['preset']} ({extra})" if extra else str(key["preset"]))
    return labels


def figure2_data(runs: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """One row per (line, cpg): what the figure plots.

    Columns: line (the legend label), the line keys, cpg, top1_mean, top1_std (sample std; NaN for
    one seed), seeds, params_m and gmac (means over the seeds), and the seeds' accuracies (a tuple).
    Empty when no line has two channel settings.
    """
    lines = [(key, rows) for key, rows in group_runs(completed(runs).dropna(subset=["cpg"]), LINE_KEYS)
             if rows["cpg"].nunique() >= 2]
    labels = _line_labels([key for key, _ in lines])
    records = []
    for label, (key, rows) in zip(labels, lines):
        for cpg, point in rows.groupby("cpg", sort=True):
            values = point[metric].dropna()
            records.append({"line": label, **key, "cpg": float(cpg),
                            "top1_mean": values.mean() if len(values) else float("nan"),
                            "top1_std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                            "seeds": len(point), "params_m": point["params_m"].mean(),
                            "gmac": point["gmac"].mean(), "values": tuple(values)})
    columns = ["line", *LINE_KEYS, "cpg", "top1_mean", "top1_std", "seeds", "params_m", "gmac", "values"]
    return pd.DataFrame(records, columns=columns)


def plot_figure2(runs: pd.DataFrame, out_stem: Path | None = None, metric: str = ACCURACY):
    """The figure (mean line, ±1 std band, faint seed points, params annotated), or None without a
    Figure-2 sweep. With `out_stem`, also written as <out_stem>.png and .pdf."""
    data = figure2_data(runs, metric)
    if data.empty:
        return None
    fig = new_figure((6.4, 4.4))
    ax = fig.subplots()
    for i, (label, line) in enumerate(data.groupby("line", sort=False)):
        color = f"C{i % 10}"
        x, y = line["cpg"].to_numpy(), line["top1_mean"].to_numpy()
        std = line["top1_std"].fillna(0).to_numpy()  # one seed: no band
        ax.plot(x, y, "o-", color=color, label=label, zorder=3)
        ax.fill_between(x, y - std, y + std, color=color, alpha=0.15, linewidth=0)
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
    ax.set_title("Accuracy against channel sharing (mean ± std over seeds; params annotated)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if out_stem is not None:
        save_figure(fig, Path(out_stem))
    return fig

