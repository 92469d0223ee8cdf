"""The report of a tuned sweep (ablate/sweep/tuning.py): which runs the tables use, and the selection.

A tuned sweep's store holds two kinds of runs: the selection runs (every cell at every value of the
tuned setting, one seed) and the final runs (every cell at its chosen value, every seed; the
selection run at the chosen value is one of them). The comparison, the claims and every figure use
the final runs only, where each operator sits at its own chosen value; the tuned setting is then
free to differ between the two sides of a claim (each side at its best rate is the fair comparison).
The selection itself is shown as a curve per cell (the validation score against the value, the
choice marked) and a table, both read from the records; `tuning.json` only says which runs were
candidates of which cell.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ablate.tracking.tuning import read_tuning
from analysis.plotting import new_figure, save_figure
from analysis.records import completed, load_runs
from analysis.tables import fmt, format_table, write_table

__all__ = ["report_runs", "selection_table", "printed_selection", "plot_selection", "write_selection"]


def report_runs(results_dir: str | Path, code: str = "separate"
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any] | None]:
    """(every run, the runs the tables use, the tuning or None): without tuning both are every run;
    with it, the candidates that were not chosen are left out of the second. `code`: what to do with
    seeds of one experiment made by different code (analysis/code_versions.py)."""
    runs = load_runs(results_dir, code=code)
    tuning = read_tuning(results_dir)
    if tuning is None or runs.empty:
        return runs, runs, tuning
    chosen = {c.get("chosen_experiment") for c in tuning["cells"]}
    candidates = {x.get("experiment") for c in tuning["cells"] for x in c.get("candidates") or []}
    left_out = candidates - chosen  # experiment keys as the records hold them
    return runs, runs[~runs["recorded_experiment"].isin(left_out)].reset_index(drop=True), tuning


def selection_table(runs: pd.DataFrame, tuning: dict[str, Any]) -> pd.DataFrame:
    """One row per cell and candidate value: the selection seed's validation score as recorded now,
    the run's status, and whether the value was chosen."""
    metric, seed = tuning["metric"], tuning["seed"]
    done = completed(runs)
    rows = []
    for cell in tuning["cells"]:
        for candidate in cell.get("candidates") or []:
            match = done[(done["experiment"] == candidate.get("experiment")) & (done["seed"] == seed)]
            score = float(match.iloc[0][metric]) if len(match) else math.nan
            rows.append({"cell": cell["label"], "setting": tuning["setting"], "value": candidate["value"],
                         "status": candidate.get("status") if not len(match) else "completed",
                         "metric": metric, "score": score,
                         "chosen": candidate["value"] == cell.get("chosen")})
    return pd.DataFrame(rows, columns=["cell", "setting", "value", "status", "metric", "score", "chosen"])


def printed_selection(table: pd.DataFrame) -> pd.DataFrame:
    return format_table(table, {
        "cell": lambda r: r["cell"], "value": lambda r: f"{r['setting']}={r['value']}",
        "status": lambda r: r["status"], "validation top-1 (%)": lambda r: fmt(r["score"], ".2f"),
        "chosen": lambda r: "chosen" if r["chosen"] else ""})


def _numeric(values) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def plot_selection(table: pd.DataFrame, path: Path) -> list[Path]:
    """The selection curves: validation score against the tuned value, a line per cell, the chosen
    value ringed; a log x axis for positive numeric values (learning rates)."""
    fig = new_figure((6.4, 4.2))
    ax = fig.subplots()
    for cell, rows in table.groupby("cell", sort=False):
        x = _numeric(rows["value"])
        positions = x if x is not None else list(range(len(rows)))
        line, = ax.plot(positions, rows["score"], marker="o", label=cell)
        chosen = rows["chosen"].to_numpy()
        ax.scatter([p for p, c in zip(positions, chosen) if c], rows["score"][chosen], s=160,
                   facecolors="none", edgecolors=line.get_color(), linewidths=2)
    values = _numeric(table["value"].unique())
    if values is not None and all(v > 0 for v in values):
        ax.set_xscale("log")
    setting = table["setting"].iloc[0] if len(table) else ""
    ax.set_xlabel(setting)
    ax.set_ylabel(f"{table['metric'].iloc[0] if len(table) else ''} (%), selection seed")
    ax.set_title(f"{setting} chosen per cell on the validation split (ringed)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_selection(runs: pd.DataFrame, tuning: dict[str, Any],
                    out_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """selection.csv/.md and selection.png/.pdf in `out_dir`."""
    table = selection_table(runs, tuning)
    paths = write_table(table, printed_selection(table), Path(out_dir) / "selection", formats=("csv", "md"))
    paths += plot_selection(table, Path(out_dir) / "selection")
    return table, paths
