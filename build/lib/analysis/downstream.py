"""The paper's Tables 3 and 4 from a store of detection and segmentation runs, and a figure of them.

One row per experiment (every setting equal but the seed, analysis.experiments), in the papers' form:
the backbone's operator and what it started from (its classification run, or scratch), box AP, AP50,
AP75 and mask AP, AP50, AP75 (detection) or mIoU and pixel accuracy (segmentation), params and
GMAC of the whole model at the task's input size; the main metric with its 95% t-interval over seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.experiments import distinguishing_settings, experiments
from analysis.plotting import new_figure, save_figure
from analysis.stats import t_interval
from analysis.tables import (
    count_cell,
    experiment_columns,
    format_table,
    interval_cell,
    number_cell,
    printed_cells,
    write_table,
)

__all__ = ["TASK_METRICS", "downstream_table", "downstream_printed", "printed_downstream", "write_downstream",
           "plot_downstream"]

# task -> (metric, printed name) in the papers' order; the first is the one with an interval
TASK_METRICS = {
    "detection": (("box_ap", "box AP"), ("box_ap50", "AP50"), ("box_ap75", "AP75"), ("mask_ap", "mask AP"),
                  ("mask_ap50", "mask AP50"), ("mask_ap75", "mask AP75")),
    "segmentation": (("miou", "mIoU"), ("pixel_acc", "pixel acc.")),
}
_KEYS = ("task", "preset", "operator", "block", "model", "data", "epochs", "train_size")
_SHOWN = ("operator", "model", "data", "epochs", "train_size")
# the metrics whose interval the table prints: each task's main one, and for detection the mask AP
_WITH_INTERVAL = {"detection": ("box_ap", "mask_ap"), "segmentation": ("miou",)}


def _backbone(run) -> str:
    return "scratch" if run["pretrained_experiment"] == "scratch" else "classification run"


def downstream_table(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """The numbers of `task`'s experiments: per metric its mean (and for the main ones their 95%
    t-interval and std), params, GMAC, seeds."""
    rows, settings = [], []
    ours = runs[runs["task"] == task]
    for experiment, group in experiments(ours) if len(ours) else []:
        first = group.iloc[0]
        row = {**{k: first[k] for k in _KEYS}, "backbone": _backbone(first), "experiment": experiment,
               "settings": "", "params_m": group["params_m"].mean(), "gmac": group["gmac"].mean()}
        for metric, _ in TASK_METRICS[task]:
            interval = t_interval(group[f"final_test_{metric}"])
            row[f"{metric}_mean"] = interval.mean
            if metric in _WITH_INTERVAL[task]:
                row.update({f"{metric}_std": interval.std, f"{metric}_low": interval.low,
                            f"{metric}_high": interval.high})
            row["seeds"] = interval.n
        rows.append(row)
        settings.append({k: v for k, v in first["settings"].items()
                         if k not in ("task.pretrained", "pretrained_from")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["settings"] = distinguishing_settings(settings, {c: list(table[c]) for c in _SHOWN})
    order = {"local_attention": 0, "dwconv": 1, "dynamic_dwconv": 2}
    table["_order"] = [order.get(p, 9) for p in table["preset"]]
    table = table.sort_values(["_order", "operator", "backbone", "settings"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def downstream_printed(task: str) -> dict:
    """printed header -> the numbers it shows (analysis.check reads them back with the same cells)."""
    cells = {}
    for metric, name in TASK_METRICS[task]:
        cells[f"{name}"] = number_cell(f"{metric}_mean", ".1f")
        if metric in _WITH_INTERVAL[task]:
            cells[f"{name} 95% CI"] = interval_cell(f"{metric}_low", f"{metric}_high", "seeds", ".1f")
    cells.update({"params (M)": number_cell("params_m", ".2f"), "GMAC": number_cell("gmac", ".3f"),
                  "seeds": count_cell("seeds", "seed")})
    return cells


def printed_downstream(table: pd.DataFrame, task: str) -> pd.DataFrame:
    columns = {"operator": lambda r: r["operator"], "backbone from": lambda r: r["backbone"],
               **experiment_columns(table, block=False)}
    columns.update(printed_cells(downstream_printed(task)))
    return format_table(table, columns)


def write_downstream(runs: pd.DataFrame, out_dir: Path) -> dict[str, pd.DataFrame]:
    """detection.md/.csv and segmentation.md/.csv for the tasks the store holds; their tables."""
    written = {}
    for task in TASK_METRICS:
        table = downstream_table(runs, task)
        if table.empty:
            continue
        write_table(table, printed_downstream(table, task), Path(out_dir) / task, formats=("csv", "md"))
        written[task] = table
    return written


def _bar_labels(table: pd.DataFrame) -> list[str]:
    """One label per pair of bars: the operator, with every shown setting that differs between the
    table's rows (a store with two model sizes or two data sets has two bars per operator)."""
    varying = [c for c in ("settings", "model", "data", "epochs", "train_size") if table[c].nunique() > 1]
    return [" ".join([str(row["operator"]), *(str(row[c]) for c in varying if str(row[c]))])
            for _, row in table.iterrows()]


def plot_downstream(tables: dict[str, pd.DataFrame], out: Path) -> list[Path] | None:
    """Each task's main metrics per operator, fine-tuned beside from scratch: the mean over seeds (bar)
    and its 95% t-interval (whisker; none for one seed)."""
    panels = [(task, metric, name) for task, table in tables.items()
              for metric, name in TASK_METRICS[task] if metric in _WITH_INTERVAL[task]]
    if not panels:
        return None
    fig = new_figure((4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (task, metric, name) in zip(axes, panels):
        table = tables[task].assign(bar=_bar_labels(tables[task]))
        labels = list(dict.fromkeys(table["bar"]))
        for k, (backbone, color) in enumerate((("classification run", "#3b6ea5"), ("scratch", "#bbbbbb"))):
            part = table[table["backbone"] == backbone].set_index("bar")
            x = np.arange(len(labels)) + (k - 0.5) * 0.38
            means, low, high = ([part.loc[b, column] if b in part.index else np.nan for b in labels]
                                for column in (f"{metric}_mean", f"{metric}_low", f"{metric}_high"))
            errors = np.array([[m - lo if np.isfinite(lo) else 0 for m, lo in zip(means, low)],
                               [hi - m if np.isfinite(hi) else 0 for m, hi in zip(means, high)]])
            label = "from scratch" if backbone == "scratch" else "fine-tuned from its classification run"
            ax.bar(x, means, width=0.36, color=color, label=label, yerr=errors, capsize=3)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(f"{task}: {name}")
    axes[0].legend(fontsize=8, loc="lower left")
    return save_figure(fig, out)
