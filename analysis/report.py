"""The report of a results folder: every figure and table, and an index linking them.

    python -m analysis.report results/demo                  # -> reports/demo/
    python -m analysis.report results/sweeps --out reports/sweeps

Writes figure2.png/.pdf, data_scale.png/.pdf (accuracy against training images), comparison.md/.tex/
.csv, cost.png/.pdf, axis_effects.md/.csv, claims.md/.csv (the paper's claims of analysis/claims.yaml,
or of --claims FILE, with verdicts), selection.png/.md/.csv (a tuned sweep's choices), weights.png
(+ weights.csv), runs.md/.csv (every run, skipped cells with their reasons, failed runs with
their errors, unreadable records with what is wrong with them) and index.md + index.html. A piece
the store cannot support (no channel sweep for Figure 2, no single-axis pair) is explained in the
index instead of failing the report; a store without any completed run is an error, since there is
nothing to report.

Exit codes: 0 the report holds every record; 1 it was written, but records that cannot be trusted
were left out (the last line says how many; runs.md lists them with the reason); 2 bad input (no
such folder, no completed run).
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ablate.cli import explain, run_cli
from analysis.check import check_tables
from analysis.claims import CLAIMS_FILE, claims_table, load_claims, printed_claims, write_claims
from analysis.code_versions import MODES, code_note
from analysis.comparison import comparison_table, printed_comparison, write_comparison
from analysis.cost import plot_cost
from analysis.data_scale import data_scale_data, plot_data_scale
from analysis.downstream import plot_downstream, printed_downstream, write_downstream
from analysis.effects import axis_effects, printed_effects, write_axis_effects
from analysis.figure2 import figure2_data, plot_figure2
from analysis.records import completed, load_runs, unreadable
from analysis.tables import fmt, format_table, to_html, to_markdown, write_table
from analysis.tuning import printed_selection, report_runs, write_selection
from analysis.weights import plot_weights, select_weight_runs, weight_maps

__all__ = ["render_report", "runs_table", "main"]


@dataclass
class _Section:
    """One part of the index: a title, an explanation, files, and a table or image to show."""

    title: str
    text: str
    files: list[str] = field(default_factory=list)
    image: str | None = None
    table: pd.DataFrame | None = None


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run as printed in runs.md: status, what it was, its accuracy, or why it has none."""
    def note(r):
        for key in ("reason", "error"):
            if isinstance(r[key], str) and r[key]:
                return r[key].splitlines()[0]
        return ""
    order = runs.sort_values(["status", "sweep", "operator", "model", "data", "seed", "run"],
                             key=lambda s: s.astype(str)).reset_index(drop=True)
    return format_table(order, {
        "status": lambda r: r["status"], "sweep": lambda r: r["sweep"], "operator": lambda r: r["operator"],
        "model": lambda r: r["model"], "data": lambda r: r["data"], "seed": lambda r: fmt(r["seed"], "d"),
        "epochs": lambda r: fmt(r["epochs_done"], "d"),
        "test top-1": lambda r: fmt(r["final_test_top1"], ".2f"),
        "run": lambda r: r["run"], "reason / error": note})


def _figure2(runs, out: Path) -> _Section:
    fig = plot_figure2(runs, out / "figure2")
    if fig is None:
        return _Section("Figure 2: accuracy against channels per group",
                        "No Figure-2 sweep in this store: no operator was run at two or more "
                        "channels-per-group settings (e.g. `sharing.channels_per_group=1,8,32`).")
    lines = figure2_data(runs)["line"].unique()
    return _Section("Figure 2: accuracy against channels per group",
                    f"{len(lines)} line(s): {', '.join(lines)}. Mean and 95% interval over seeds (band: "
                    "Student-t interval of the mean; one seed has none), seeds as faint points, params (M) "
                    "annotated.", ["figure2.png", "figure2.pdf"],
                    image="figure2.png")


def _data_scale(runs, out: Path) -> _Section:
    title = "Accuracy against training images"
    if plot_data_scale(runs, out / "data_scale") is None:
        return _Section(title, "No data-scale sweep in this store: no operator was run at two or more "
                               "training-set sizes (`sweeps=data_scale`, or `data.train_subset=1000,10000`).")
    lines = data_scale_data(runs)["line"].unique()
    return _Section(title, f"{len(lines)} line(s): {', '.join(lines)}. Mean and 95% interval over seeds "
                    "(band), seeds as faint points; log x axis.", ["data_scale.png", "data_scale.pdf"],
                    image="data_scale.png")


def _weights(runs, out: Path) -> _Section:
    title = "Effective weights"
    selected = select_weight_runs(runs)
    if selected.empty:
        return _Section(title, "No completed run with a checkpoint: nothing to draw.")
    maps, problems = [], []
    for _, run in selected.iterrows():
        try:
            maps.append(weight_maps(run["path"]))
        except Exception as err:  # noqa: BLE001  one run's missing data must not sink the report
            problems.append(f"{run['preset']}: {type(err).__name__}: {err}")
    text = ("w[n, g, i, j] of the first mixer of stage 1 (weight group 0), for real test images (rows) "
            "and output positions i (columns, marked x), one run per preset (seed 0 where there is one). "
            "Variation = std of the kernels in offset coordinates at interior positions, over images "
            "(same position) and over positions (same image), divided by the mean |w|: static weights "
            "give 0 across images, weights shared over offsets 0 across positions.")
    if problems:
        text += " Not drawn: " + "; ".join(problems)
    if not maps:
        return _Section(title, text)
    plot_weights(maps, out / "weights.png")
    numbers = pd.DataFrame([{"preset": m.preset, "operator": m.operator, "run": Path(m.run).name,
                             "stage": m.stage, "positions": " ".join(f"{h},{w}" for h, w in m.positions),
                             "across_images": m.across_images, "across_positions": m.across_positions}
                            for m in maps])
    numbers.to_csv(out / "weights.csv", index=False)
    printed = format_table(numbers, {"operator": lambda r: r["operator"],
                                     "positions": lambda r: r["positions"],
                                     "across images": lambda r: fmt(r["across_images"], ".4f"),
                                     "across positions": lambda r: fmt(r["across_positions"], ".4f")})
    return _Section(title, text, ["weights.png", "weights.csv"], image="weights.png", table=printed)


def _runs_numbers(runs: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: every column, the settings as one JSON object per run."""
    numbers = runs.copy()
    numbers["settings"] = [json.dumps(s, default=str) if isinstance(s, dict) else ""
                           for s in runs["settings"]]
    return numbers


def render_report(results_dir: str | Path, out_dir: str | Path | None = None, weights: bool = True,
                  claims_file: str | Path = CLAIMS_FILE, code: str = "separate") -> Path:
    """Write the report of the runs under `results_dir` into `out_dir` (default reports/<name of
    results_dir>); returns the path of index.md. Raises ValueError without a completed run or with a
    claims file that cannot be read. Unreadable records are listed in runs.md and left out of
    everything else. `code`: what to do with seeds of one experiment made by different code
    (separate, newest, pool: analysis/code_versions.py)."""
    results_dir = Path(results_dir)
    claims = load_claims(claims_file)
    out = Path(out_dir) if out_dir is not None else Path("reports") / results_dir.resolve().name
    every_run, runs, tuning = report_runs(results_dir, code)  # tuned sweep: the tables use the chosen values
    free = (tuning["setting"],) if tuning else ()
    if runs.empty:
        raise ValueError(f"no runs in {results_dir}: no results.json below it. Train a sweep first "
                         f"(python -m ablate.train -m ... trainer.results_root=...).")
    if completed(runs).empty:
        counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
        raise ValueError(f"no completed run in {results_dir} ({counts}): nothing to report. "
                         f"See the reasons and errors in the runs' results.json.")
    out.mkdir(parents=True, exist_ok=True)
    before = _files_in(out)
    everything = runs  # the claims read every task's runs; the classification sections their own
    runs = runs[runs["task"] == "classification"].reset_index(drop=True)

    note = code_note(load_runs(results_dir, code="pool"), everything, code)
    sections = [_Section("Code", note + " A record names its code by the fingerprint of the package's "
                         "sources (and the git commit, + where the sources differed from it); `python -m "
                         "ablate.tracking.code` prints this checkout's, so a report whose code is not the "
                         "checkout's was made by other code.")]
    sections += _downstream(everything, out)
    if not completed(runs).empty:
        sections += _classification(runs, every_run, tuning, out)
    write_claims(everything, out, claims, free=free)
    sections.append(_Section(
        "The paper's claims", f"Each claim of {Path(claims_file).name} compares two operators trained in one "
        "experiment otherwise (every setting outside the operator equal), paired by seed: Δ = to - from "
        "of the claim's metric with its paired 95% t-interval. better: supported when the interval is above "
        "0, contradicted when below; on par: supported when the interval lies within ±tolerance, "
        "contradicted when wholly outside; otherwise unresolved, with the paired seeds that would settle "
        "it 4 times in 5. A claim whose two sides this store does not hold in one experiment says so."
        + (f" Tuned sweep: each side at its own chosen {tuning['setting']}." if tuning else ""),
        ["claims.md", "claims.csv"], table=printed_claims(claims_table(everything, claims, free=free))))
    if weights and not completed(runs).empty:
        sections.append(_weights(runs, out))
    runs = every_run  # the runs table lists all of them, selection runs included
    printed_runs = runs_table(runs)
    write_table(_runs_numbers(runs), printed_runs, out / "runs", formats=("csv", "md"))
    counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
    left_out = len(unreadable(runs))
    sections.append(_Section("Runs", f"{len(runs)} runs: {counts}." + (
        f" {left_out} unreadable record(s) were left out of every table and figure; the reason for each "
        "is under reason / error." if left_out else ""), ["runs.md", "runs.csv"], table=printed_runs))

    title = f"ablate report: {results_dir}"
    (out / "index.md").write_text(_index_markdown(title, sections))
    (out / "index.html").write_text(_index_html(title, sections))
    _forget_stale_files(out, before)
    return out / "index.md"


MANIFEST = ".report-files.json"  # the files a render wrote into its folder


def _files_in(out: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()
            if p.is_file()}


def _forget_stale_files(out: Path, before: dict[str, tuple[int, int, int]]) -> None:
    """Remove what the previous render wrote and this one did not (weights.png after --no-weights, a
    figure the store no longer supports): a stale file beside the new ones reads as part of the new
    report. Only files the previous render's manifest names are removed, never another file of the
    folder; this render's files (new, or changed since the render began) are the new manifest."""
    written = sorted(name for name, state in _files_in(out).items()
                     if name != MANIFEST and before.get(name) != state)
    try:
        previous = json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        previous = []
    for name in set(previous if isinstance(previous, list) else []) - set(written):
        path = out / str(name)
        if path.parent == out and path.is_file():
            path.unlink()
    (out / MANIFEST).write_text(json.dumps(written, indent=0) + "\n")


def _downstream(runs: pd.DataFrame, out: Path) -> list[_Section]:
    """The paper's Tables 3 and 4 where the store holds detection or segmentation runs."""
    tables = write_downstream(runs, out)
    if not tables:
        return []
    sections = []
    texts = {"detection": "Table 3 of the paper: Mask R-CNN on each backbone (ablate/models/dense.py; the "
                          "paper uses Cascade Mask R-CNN, which torchvision does not have), box and mask AP "
                          "by pycocotools on the test split (AP at IoU 0.50:0.95, 0.50, 0.75).",
             "segmentation": "Table 4 of the paper: UPerNet on each backbone, mIoU (the mean over classes "
                             "of intersection over union, classes absent from labels and predictions left "
                             "out) and pixel accuracy over the labelled pixels of the test split."}
    titles = {"detection": "Table 3: detection and instance segmentation",
              "segmentation": "Table 4: semantic segmentation"}
    for task, table in tables.items():
        sections.append(_Section(
            titles[task], texts[task] + " One row per experiment, the mean over its seeds and the "
            "95% t-interval of the mean; params and GMAC of the whole model at the task's input size (the "
            "backbone counted analytically, the rest by PyTorch's FLOP formulas); backbone from: its "
            "classification run of the same operator and seed, or scratch.", [f"{task}.md", f"{task}.csv"],
            table=printed_downstream(table, task)))
    if plot_downstream(tables, out / "downstream") is not None:
        sections.append(_Section("Fine-tuned against from scratch", "Each task's main metric per operator: "
                                 "the mean over seeds (bars) and its 95% interval (whiskers).",
                                 ["downstream.png", "downstream.pdf"], image="downstream.png"))
    return sections


def _classification(runs: pd.DataFrame, every_run: pd.DataFrame, tuning, out: Path) -> list[_Section]:
    """The classification sections: Figure 2, data scale, selection, comparison, cost, axis effects."""
    sections = [_figure2(runs, out), _data_scale(runs, out)]
    if tuning:
        selection, _ = write_selection(every_run, tuning, out)
        sections.insert(0, _Section(
            f"Selection of {tuning['setting']}", f"Every cell at each value of {tuning['setting']} with seed "
            f"{tuning['seed']}, scored on the validation split ({tuning['metric']}); the best value (ringed) "
            "is trained with every seed, and every other table and figure uses those runs only: each "
            f"operator at its own {tuning['setting']}.", ["selection.png", "selection.pdf", "selection.md",
                                                         "selection.csv"],
            image="selection.png", table=printed_selection(selection)))
    write_comparison(runs, out)
    sections.append(_Section("Comparison", "One row per experiment (every setting equal but the seed), "
                             "averaged over its seeds (top-1: final test accuracy; 95% CI: Student-t "
                             "interval of the mean over seeds; one seed has no interval). Rows that differ "
                             "in a setting no column shows name it under settings. Ordered by connectivity, "
                             "spatial sharing, dynamic, channels per group.",
                             ["comparison.md", "comparison.tex", "comparison.csv"],
                             table=printed_comparison(comparison_table(runs))))
    plot_cost(runs, out / "cost")
    sections.append(_Section("Accuracy against cost", "Pareto front dashed (no other operator is at least "
                             "as accurate and at least as cheap); front points outlined.",
                             ["cost.png", "cost.pdf"], image="cost.png"))
    write_axis_effects(runs, out)
    effects = axis_effects(runs)
    sections.append(_Section(
        "Axis effects", "Pairs of experiments that differ in exactly one axis and in nothing else, paired "
        "by seed: Δ = to - from (mean over the paired seeds, with its paired 95% t-interval). The verdict "
        "is resolved when the interval excludes 0, else unresolved; seeds to resolve = paired seeds at "
        "which a difference of this size and spread is resolved 4 times in 5. Speed ratio = to / from "
        "training images/s."
        + ("" if len(effects) else " No such pair in this store."),
        ["axis_effects.md", "axis_effects.csv"], table=printed_effects(effects) if len(effects) else None))
    return sections


def _index_markdown(title: str, sections: list[_Section]) -> str:
    def prose(text: str) -> str:  # a `<` of a name or path would be HTML to a Markdown renderer
        return text.replace("<", "\\<")

    parts = [f"# {prose(title)}\n"]
    for s in sections:
        parts.append(f"## {prose(s.title)}\n\n{prose(s.text)}\n")
        if s.files:
            parts.append("Files: " + ", ".join(f"[{f}]({f})" for f in s.files) + "\n")
        if s.image:
            parts.append(f"![{s.title}]({s.image})\n")
        if s.table is not None:
            parts.append(to_markdown(s.table))
    return "\n".join(parts)


def _index_html(title: str, sections: list[_Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>\n<p>{html.escape(s.text)}</p>")
        if s.files:
            body.append("<p>Files: " + ", ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>'
                                                for f in s.files) + "</p>")
        if s.image:
            body.append(f'<img src="{html.escape(s.image)}" alt="{html.escape(s.title)}" '
                        'style="max-width:100%">')
        if s.table is not None:
            body.append(to_html(s.table))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results folder (searched recursively for results.json)")
    parser.add_argument("--out", help="report folder (default: reports/<name of the results folder>)")
    parser.add_argument("--no-weights", action="store_true", help="skip the weight maps (no checkpoints "
                        "are loaded)")
    parser.add_argument("--claims", default=str(CLAIMS_FILE), help="the claims to judge (default: "
                        "analysis/claims.yaml)")
    parser.add_argument("--code", choices=MODES, default="separate", help="seeds of one experiment made by "
                        "different code: kept apart (default), only the newest code's, or pooled on purpose")
    args = parser.parse_args(argv)
    try:
        index = render_report(args.results, args.out, weights=not args.no_weights, claims_file=args.claims,
                              code=args.code)
    except (ValueError, FileNotFoundError) as err:  # ClaimsFileError is a ValueError
        # a path the system refused says what to change (ablate.cli), not only Python's words
        print(f"error: {explain(err) or err}", file=sys.stderr)
        return 2
    # the tables say what the records say
    checked = check_tables(args.results, index.parent, args.claims, args.code)
    print(f"report written to {index.parent}/ (open {index} or {index.with_suffix('.html')}); "
          f"{checked} numbers of its tables checked against the results.json files")
    runs = load_runs(args.results)
    left_out = unreadable(runs)
    if len(left_out):
        for _, run in left_out.iterrows():
            print(f"  unreadable: {run['path']}/results.json: {run['reason']}", file=sys.stderr)
        print(f"{len(left_out)} of {len(runs)} records left out as unreadable (listed in "
              f"{index.parent / 'runs.md'})")
        return 1
    print(f"all {len(runs)} records read")
    return 0


if __name__ == "__main__":
    run_cli(main)
