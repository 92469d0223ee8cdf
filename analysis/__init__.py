"""Analysis of ablate's results store: records -> pandas -> Figure-2 curves, tables, report.

    from analysis import load_runs, comparison_table, plot_figure2, render_report
    runs = load_runs("results/demo")                 # one tidy row per run (results.json)
    comparison_table(runs)                            # operator x model x data, over seeds
    render_report("results/demo", "reports/demo")     # every figure and table + index.md/.html

The results store is the source of truth; `load_wandb_runs` reads the W&B mirror into the same rows.
Modules, one concern each: records, wandb_source, axes, tables, comparison, effects, claims (the paper's
claims of claims.yaml, with verdicts), figure2, cost, weights, check, report.
"""
from analysis.check import TableMismatch, check_tables
from analysis.claims import claims_table, load_claims, write_claims
from analysis.comparison import ACCURACY, comparison_table, printed_comparison, write_comparison
from analysis.cost import pareto_front, pareto_fronts, plot_cost
from analysis.effects import axis_effects, printed_effects, write_axis_effects
from analysis.figure2 import figure2_data, plot_figure2
from analysis.records import COLUMNS, completed, load_runs, row_from_record
from analysis.wandb_source import load_wandb_runs, record_from_wandb, row_from_wandb_run
from analysis.weights import WeightMaps, plot_weights, select_weight_runs, weight_maps, weight_variation

__all__ = [
    "ACCURACY", "COLUMNS", "TableMismatch", "WeightMaps", "axis_effects", "check_tables", "claims_table",
    "comparison_table", "load_claims", "write_claims",
    "completed", "figure2_data", "load_runs", "load_wandb_runs", "pareto_front", "pareto_fronts", "plot_cost",
    "plot_figure2",
    "plot_weights", "printed_comparison", "printed_effects", "record_from_wandb", "render_report",
    "row_from_record", "row_from_wandb_run", "select_weight_runs", "weight_maps", "weight_variation",
    "write_axis_effects", "write_comparison",
]


def __getattr__(name: str):
    # analysis.report is imported on first use, not here: `python -m analysis.report` would otherwise
    # find its own module already imported by the package (runpy warns about that).
    if name == "render_report":
        from analysis.report import render_report

        return render_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
