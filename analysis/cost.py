"""Accuracy against cost: GMAC and training throughput, with the Pareto front marked.

An operator is worth its cost only if no other one is at least as accurate and at least as cheap:
those undominated operators form the Pareto front. Points are the comparison table's rows (means
over seeds), so the plot and the table always agree. Accuracies are comparable only when measured on
the same test data after the same training (data, epochs, training images): a store that holds
several such contexts gets one front per context, never one across them; and throughputs only when
timed on the same processor (analysis.speeds): the throughput panel has a front per processor too.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.comparison import ACCURACY, comparison_table
from analysis.plotting import new_figure, save_figure

__all__ = ["pareto_front", "pareto_fronts", "plot_cost", "COST_PANELS", "CONTEXT"]

# (x column, axis label, which x is better, what else than the CONTEXT makes two rows' x comparable:
# a throughput only with one measured on the same processor, analysis.speeds)
COST_PANELS = (("gmac", "GMAC per image", "lower", ()),
               ("train_samples_per_s", "training images / s", "higher", ("timed_on",)))


def pareto_front(frame: pd.DataFrame, x: str, y: str, x_better: str = "lower",
                 y_better: str = "higher") -> pd.Series:
    """Boolean Series (frame's index): True for the rows no other row dominates.

    A row is dominated when another is at least as good in both x and y and strictly better in one.
    Rows with a missing x or y are never on the front; equal rows do not dominate each other.
    """
    for name, better in (("x_better", x_better), ("y_better", y_better)):
        if better not in ("lower", "higher"):
            raise ValueError(f"{name} must be 'lower' or 'higher', not {better!r}")
    sx = 1.0 if x_better == "higher" else -1.0  # turn both into "higher is better"
    sy = 1.0 if y_better == "higher" else -1.0
    points = [(sx * a, sy * b) for a, b in zip(frame[x].astype(float), frame[y].astype(float))]
    valid = [a == a and b == b for a, b in points]  # NaN != NaN
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(valid[j] and j != i and c >= a and d >= b and (c > a or d > b)
                        for j, (c, d) in enumerate(points))
        front.append(valid[i] and not dominated)
    return pd.Series(front, index=frame.index, dtype=bool)


# the comparison table's columns within which accuracies are comparable (not the model: a larger
# model for more GMAC is the trade-off a front shows)
CONTEXT = ("data", "epochs", "train_size")


def pareto_fronts(table: pd.DataFrame, x: str, y: str, x_better: str = "lower",
                  within: tuple[str, ...] = ()) -> pd.Series:
    """pareto_front within each CONTEXT (and value of the `within` columns) of the table (one
    context: the front of all rows)."""
    front = pd.Series(False, index=table.index, dtype=bool)
    for _, rows in table.groupby([*CONTEXT, *within], dropna=False, sort=False):
        front[rows.index] = pareto_front(rows, x, y, x_better=x_better)
    return front


def _context_text(row, within: tuple[str, ...] = ()) -> str:
    return ", ".join([f"{row['data']}, {row['epochs']} epochs, {row['train_size']} images",
                      *(str(row[c]) for c in within)])


def _labels(table: pd.DataFrame, within: tuple[str, ...] = ()) -> list[str]:
    """Operator names, with model, data, the distinguishing settings and the `within` columns where
    the table mixes several."""
    labels = []
    for _, row in table.iterrows():
        extra = [str(row[c]) for c in ("model", "data", *within) if table[c].nunique() > 1]
        extra += [row["settings"]] if row["settings"] else []
        labels.append(row["operator"] + (f" ({', '.join(extra)})" if extra else ""))
    return labels


def plot_cost(runs: pd.DataFrame, out_stem: Path | None = None, metric: str = ACCURACY):
    """Two panels (accuracy against GMAC, against training throughput), each with its Pareto front;
    None without completed runs. With `out_stem`, also written as <out_stem>.png and .pdf."""
    table = comparison_table(runs, metric)
    if table.empty:
        return None
    fig = new_figure((11, 4.6))
    axes = fig.subplots(1, len(COST_PANELS))
    for ax, (x, xlabel, better, within) in zip(axes, COST_PANELS):
        labels = _labels(table, within)
        contexts = table.groupby([*CONTEXT, *within], dropna=False, sort=False)
        front = pareto_fronts(table, x, "top1_mean", x_better=better, within=within)
        for i, row in table.iterrows():
            on_front = bool(front.iloc[i])
            # the 95% interval of the mean; one seed has none (no bar, not a bar of 0). An accuracy lies
            # in [0, 100]: the bar is drawn inside it, as Figure 2's bands (the tables keep the interval)
            yerr = None if pd.isna(row["ci_low"]) else [[row["top1_mean"] - max(row["ci_low"], 0.0)],
                                                        [min(row["ci_high"], 100.0) - row["top1_mean"]]]
            ax.errorbar(row[x], row["top1_mean"], yerr=yerr,
                        fmt="o", color=f"C{i % 10}", markersize=7 if on_front else 5,
                        markeredgecolor="black" if on_front else "none", capsize=2)
            ax.annotate(labels[i], (row[x], row["top1_mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        for k, (_, rows) in enumerate(contexts):
            edge = rows[front[rows.index]].sort_values(x)
            if len(edge):
                name = "Pareto front" + (f" ({_context_text(edge.iloc[0], within)})" if contexts.ngroups > 1
                                         else "")
                ax.plot(edge[x], edge["top1_mean"], ("--", ":", "-.")[k % 3], color="black", linewidth=1,
                        label=name, zorder=1)
        if front.any():
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(f"{xlabel} ({better} is better)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Accuracy against cost (mean, 95% interval over seeds)", fontsize=10)
    if out_stem is not None:
        save_figure(fig, Path(out_stem))
    return fig
