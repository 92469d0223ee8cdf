"""The analysis on a real mini store (tests/mini_store.py): every number it prints is recomputed here
independently, straight from the results.json files with the json module and plain Python
arithmetic, so that a bug shared by the analysis and its own checker cannot hide."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from mini_store import REPO, mini_store  # noqa: F401  (the session fixture)
from omegaconf import OmegaConf

from analysis import (
    TableMismatch,
    axis_effects,
    check_tables,
    comparison_table,
    figure2_data,
    load_runs,
    pareto_front,
    pareto_fronts,
    plot_figure2,
    row_from_record,
    row_from_wandb_run,
    select_weight_runs,
    weight_maps,
    weight_variation,
)
from analysis.report import main as report_main
from analysis.report import render_report

pytestmark = pytest.mark.xdist_group("mini_store")


# -- independent recomputation ------------------------------------------------------------------
def read_records(root: Path) -> list[dict]:
    records = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if "results.json" in files:
            with open(os.path.join(folder, "results.json")) as f:
                records.append(json.load(f))
    return records


def mean(values):
    return sum(values) / len(values) if values else math.nan


def stdev(values):
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_interval(values):
    """scipy's 95% t-interval of the mean (NaN for fewer than 2 values; equal values, whose standard
    error is 0 and which scipy answers with NaN, give the point itself: analysis.stats' rule)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    if stdev(values) == 0:
        return mean(values), mean(values)
    n = len(values)
    return stats.t.interval(0.95, n - 1, loc=mean(values), scale=stdev(values) / math.sqrt(n))


def experiment_of(record) -> str:
    """The experiment key, recomputed: sha256 of the identity without its seed."""
    identity = {k: v for k, v in record["identity"].items() if k != "seed"}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    assert key == record["experiment"], record["run"]
    return key


def rate(record, key):
    value = record.get(key)
    return value if value is not None and value > 0 else None  # 0 = not measured


def budget(record):
    return (record["model"], record["data"], str(record["epochs"]), str(record["train_size"]))


def expected_comparison(root: Path) -> dict[tuple, dict]:
    """Per printed key (operator, block, model, data, epochs, train images): the numbers of the one
    experiment it shows (the stores used here have one experiment per printed key)."""
    groups: dict[str, list[dict]] = {}
    for r in read_records(root):
        if r["status"] == "completed":
            groups.setdefault(experiment_of(r), []).append(r)
    expected = {}
    for rs in groups.values():
        top1 = [r["final_test_top1"] for r in rs]
        rates = {k: [rate(r, k) for r in rs if rate(r, k) is not None]
                 for k in ("train_samples_per_s", "inference_samples_per_s")}
        low, high = t_interval(top1)
        key = (rs[0]["operator"], rs[0]["block"], *budget(rs[0]))
        assert key not in expected, f"two experiments print as {key}"
        expected[key] = {"params_m": mean([r["params_m"] for r in rs]), "gmac": mean([r["gmac"] for r in rs]),
                         **{k: mean(v) for k, v in rates.items()},
                         "top1_mean": mean(top1), "top1_std": stdev(top1), "ci_low": low, "ci_high": high,
                         "seeds": len({r["seed"] for r in rs})}
    return expected


def expected_effect(root: Path, row: dict) -> dict:
    """The numbers of one axis-effect row, from the records of its two operators, paired by seed."""
    by = {}
    for r in read_records(root):
        if r["status"] == "completed":
            by.setdefault((r["operator"], r["block"], *budget(r)), {}).setdefault(r["seed"], r)
    rest = (row["block"], row["model"], row["data"], row["epochs"], row["train_size"])
    src, dst = by[(row["from_operator"], *rest)], by[(row["to_operator"], *rest)]
    seeds = sorted(set(src) & set(dst))
    delta = [dst[s]["final_test_top1"] - src[s]["final_test_top1"] for s in seeds]
    low, high = t_interval(delta)
    return {"pairs": len(seeds), "delta_top1_mean": mean(delta), "delta_top1_std": stdev(delta),
            "ci_low": low, "ci_high": high,
            "delta_params_m": mean([dst[s]["params_m"] - src[s]["params_m"] for s in seeds]),
            "delta_gmac": mean([dst[s]["gmac"] - src[s]["gmac"] for s in seeds]),
            "speed_ratio": mean([dst[s]["train_samples_per_s"] / src[s]["train_samples_per_s"]
                                 for s in seeds])}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_markdown(path: Path) -> list[dict]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def close_csv(text: str, value: float) -> bool:
    if text == "" or (isinstance(value, float) and math.isnan(value)):
        return text == "" and math.isnan(value)
    return math.isclose(float(text), value, rel_tol=1e-9, abs_tol=1e-12)


def close_printed(text: str, value: float) -> bool:
    """Equal within the printed rounding (half a unit of the last digit)."""
    if text == "n/a" or math.isnan(value):
        return text == "n/a" and math.isnan(value)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def split_interval(text: str) -> tuple[str, str]:
    """"[1.25, 3.50]" -> ("1.25", "3.50"); "1 seed: no interval" -> ("n/a", "n/a")."""
    if not text.startswith("["):
        return "n/a", "n/a"
    low, high = text[1:-1].split(", ")
    return low, high


def verify_comparison(results: Path, report: Path) -> int:
    expected = expected_comparison(results)
    checked = 0
    csv_rows = read_csv(report / "comparison.csv")
    assert {(r["operator"], r["block"], r["model"], r["data"], r["epochs"], r["train_size"])
            for r in csv_rows} == set(expected)
    for r in csv_rows:
        want = expected[(r["operator"], r["block"], r["model"], r["data"], r["epochs"], r["train_size"])]
        for column, value in want.items():
            assert close_csv(r[column], float(value)), (r["operator"], column, r[column], value)
            checked += 1
    md_rows = read_markdown(report / "comparison.md")
    assert len(md_rows) == len(expected)
    printed = {"params (M)": "params_m", "GMAC": "gmac", "train img/s": "train_samples_per_s",
               "inference img/s": "inference_samples_per_s", "top-1 (%)": "top1_mean"}
    for r in md_rows:
        want = expected[(r["operator"], r["block"], r["model"], r["data"], r["epochs"], r["train images"])]
        for header, column in printed.items():
            assert close_printed(r[header], float(want[column])), (r["operator"], header, r[header])
        low, high = split_interval(r["95% CI"])
        assert close_printed(low, want["ci_low"]) and close_printed(high, want["ci_high"]), r
        seeds = want["seeds"]
        assert r["seeds"] == f"{seeds} seed{'s' if seeds != 1 else ''}"
        assert seeds > 1 or r["95% CI"] == "1 seed: no interval"
        checked += len(printed) + 3
    return checked


def verify_effects(results: Path, report: Path) -> int:
    checked = 0
    for r in read_csv(report / "axis_effects.csv"):
        want = expected_effect(results, r)
        for column, value in want.items():
            assert close_csv(r[column], float(value)), (r["from_operator"], r["to_operator"], column)
            checked += 1
    for r in read_markdown(report / "axis_effects.md"):
        want = expected_effect(results, {"from_operator": r["from operator"], "to_operator": r["to operator"],
                                         "block": r["block"], "model": r["model"], "data": r["data"],
                                         "epochs": r["epochs"], "train_size": r["train images"]})
        assert close_printed(r["Δtop-1 (points)"], want["delta_top1_mean"])
        low, high = split_interval(r["95% CI"])
        assert close_printed(low, want["ci_low"]) and close_printed(high, want["ci_high"])
        # tied pairs (no spread) make an interval of no width, which resolves nothing
        resolved = want["delta_top1_std"] > 0 and (want["ci_low"] > 0 or want["ci_high"] < 0)
        assert r["verdict"] == ("resolved" if resolved else "unresolved")
        if resolved or want["delta_top1_std"] > 0:
            assert r["seeds to resolve"] == "-" if resolved else int(r["seeds to resolve"].lstrip("> ")) >= 2
        assert r["paired seeds"] == f"{want['pairs']} seeds"
        assert close_printed(r["Δparams (M)"], want["delta_params_m"])
        assert close_printed(r["ΔGMAC"], want["delta_gmac"])
        assert close_printed(r["speed ratio"], want["speed_ratio"])
        checked += 6
    return checked


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(mini_store):  # noqa: F811
    return load_runs(mini_store)


@pytest.fixture(scope="module")
def report(mini_store, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report")
    render_report(mini_store, out)
    return out


def test_a_render_removes_what_the_previous_render_wrote_and_it_did_not(mini_store, report, tmp_path):  # noqa: F811
    """Rendered again with --no-weights, the folder kept the first render's weights.png (which the
    README shows) beside the new files; a file of the user's in the folder is never touched."""
    out = tmp_path / "again"
    shutil.copytree(report, out)
    (out / "notes.txt").write_text("mine")
    assert (out / "weights.png").exists()
    render_report(mini_store, out, weights=False)
    assert not (out / "weights.png").exists() and not (out / "weights.csv").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.md").exists()
    render_report(mini_store, out)  # and back: the weights are written again
    assert (out / "weights.png").exists() and (out / "notes.txt").exists()


def run_path(runs, operator, seed=0) -> str:
    return runs[(runs["operator"] == operator) & (runs["seed"] == seed)]["path"].iloc[0]


# -- records ------------------------------------------------------------------------------------
def test_load_runs_one_row_per_results_json(runs, mini_store):  # noqa: F811
    records = read_records(mini_store)
    assert len(runs) == len(records) == 13  # 8 + 4 trained, 1 skipped; nothing from .hydra/
    assert runs["status"].value_counts().to_dict() == {"completed": 12, "skipped": 1}
    for column in ("preset", "operator", "connectivity", "kernel_size", "shift", "spatial",
                   "channels_per_group", "groups", "dynamic", "block", "model", "data", "seed", "params",
                   "params_m", "gmac",
                   "train_samples_per_s", "inference_samples_per_s", "final_test_top1", "best_val_top1",
                   "epochs", "train_size", "status", "reason", "error", "sweep", "path", "cpg"):
        assert column in runs.columns, column
    skipped = runs[runs["status"] == "skipped"].iloc[0]
    assert skipped["operator"] == "dwconv[dynamic=attention]"
    assert "attention needs spatial: none" in skipped["reason"] and skipped["rule"]
    assert math.isnan(skipped["final_test_top1"])
    mlp = runs[runs["preset"] == "local_mlp"].groupby("operator")["cpg"].first().to_dict()
    assert mlp == {"local_mlp[channels_per_group=1]": 1.0, "local_mlp[channels_per_group=8]": 8.0,
                   "local_mlp": 32.0}
    by_path = {r["run"]: r for r in records}
    for _, row in runs.iterrows():
        record = by_path[Path(row["path"]).name]
        assert row["final_test_top1"] == record.get("final_test_top1") or record["status"] == "skipped"
        assert row["seed"] == record["seed"] and row["sweep"] == "mini"


def test_load_runs_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "nope")


# -- comparison table ---------------------------------------------------------------------------
def test_comparison_numbers_equal_the_results_json(report, mini_store):  # noqa: F811
    assert verify_comparison(mini_store, report) == 6 * 9 + 6 * 8
    order = [r["operator"] for r in read_csv(report / "comparison.csv")]
    assert order == ["local_mlp[channels_per_group=1]", "local_mlp[channels_per_group=8]", "local_mlp",
                     "local_attention", "dwconv", "dynamic_dwconv"]  # window < sliding; window < none; cpg
    tex = (report / "comparison.tex").read_text()
    assert r"\begin{tabular}" in tex and tex.count(r"\\") == 1 + 6  # header + rows
    assert "local\\_mlp" in tex and "[" in tex


def test_axis_effects_numbers_equal_the_results_json(report, mini_store):  # noqa: F811
    rows = read_csv(report / "axis_effects.csv")
    found = {(r["axis"], r["from"], r["to"], r["from_operator"], r["to_operator"]) for r in rows}
    assert found == {  # local_mlp -> local_attention flips two axes (spatial and dynamic): not a row
        ("channels", "1 per group", "8 per group", "local_mlp[channels_per_group=1]",
         "local_mlp[channels_per_group=8]"),
        ("channels", "1 per group", "32 per group", "local_mlp[channels_per_group=1]", "local_mlp"),
        ("channels", "8 per group", "32 per group", "local_mlp[channels_per_group=8]", "local_mlp"),
        ("dynamic", "static", "homogeneous", "dwconv", "dynamic_dwconv"),
    }
    assert all(r["pairs"] == "2" for r in rows)
    assert verify_effects(mini_store, report) == 4 * 8 + 4 * 6


def test_check_tables_counts_and_catches_an_edit(report, mini_store, tmp_path):  # noqa: F811
    assert check_tables(mini_store, report) > 50
    edited = tmp_path / "edited"
    shutil.copytree(report, edited)
    md = (edited / "comparison.md").read_text()
    first = read_markdown(edited / "comparison.md")[0]["params (M)"]
    (edited / "comparison.md").write_text(md.replace(f"| {first} |", f"| {float(first) + 0.01:.3f} |", 1))
    with pytest.raises(TableMismatch, match="params"):
        check_tables(mini_store, edited)


# -- Figure 2 -----------------------------------------------------------------------------------
def test_figure2_plots_the_per_cpg_means(runs, report, mini_store):  # noqa: F811
    assert (report / "figure2.png").stat().st_size > 1000 and (report / "figure2.pdf").stat().st_size > 1000
    data = figure2_data(runs)
    assert list(data["line"].unique()) == ["local_mlp"]  # the only preset run at several cpg
    values: dict[int, list[float]] = {}
    for r in read_records(mini_store):
        if r["status"] == "completed" and r["preset"] == "local_mlp":
            values.setdefault(r["stage_channels_per_group"][0], []).append(r["final_test_top1"])
    assert data["cpg"].tolist() == [1.0, 8.0, 32.0]
    for _, point in data.iterrows():
        acc = values[int(point["cpg"])]
        assert point["top1_mean"] == pytest.approx(mean(acc), abs=1e-12)
        assert point["top1_std"] == pytest.approx(stdev(acc), abs=1e-12)
        assert sorted(point["values"]) == sorted(acc) and point["seeds"] == 2
    fig = plot_figure2(runs)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [1.0, 8.0, 32.0]
    assert list(line.get_ydata()) == pytest.approx([mean(values[c]) for c in (1, 8, 32)], abs=1e-12)
    assert fig.axes[0].get_xscale() == "log"


def test_no_figure2_sweep_is_explained_and_no_completed_run_is_an_error(runs, tmp_path):
    store = tmp_path / "store"
    for _, row in runs[runs["preset"].isin(["dwconv"])].iterrows():  # results.json only: no weights
        (store / row["run"]).mkdir(parents=True)
        shutil.copy(Path(row["path"]) / "results.json", store / row["run"])
    index = render_report(store, tmp_path / "report")
    text = index.read_text()
    assert "No Figure-2 sweep" in text and not (tmp_path / "report" / "figure2.png").exists()
    assert "No such pair" in text and "nothing to draw" in text
    assert (tmp_path / "report" / "comparison.md").exists()
    for folder in store.iterdir():
        if json.loads((folder / "results.json").read_text())["status"] != "skipped":
            shutil.rmtree(folder)
    with pytest.raises(ValueError, match="no completed run"):
        render_report(store, tmp_path / "report2")
    assert report_main([str(tmp_path / "empty-does-not-exist")]) == 2


def test_a_store_without_a_completed_run_gives_empty_tables_not_a_key_error(runs, tmp_path):
    """The notebooks call these on whatever a store holds. With no completed run (an empty store, a
    sweep whose first runs are still training, only skipped or failed cells) every one raised
    KeyError: 'experiment' (an empty list of row flags selected no columns); now each is empty."""
    from analysis import plot_cost

    store = tmp_path / "store"
    store.mkdir()
    for frame in (load_runs(store), runs[runs["status"] == "skipped"].reset_index(drop=True)):
        assert len(frame) <= 1 and not (frame["status"] == "completed").any()
        assert comparison_table(frame).empty and figure2_data(frame).empty
        assert axis_effects(frame).empty and plot_figure2(frame) is None and plot_cost(frame) is None
        assert select_weight_runs(frame).empty and "preset" in select_weight_runs(frame).columns


def test_markdown_cells_stay_on_their_row_and_read_back_as_written(tmp_path):
    """A name with a line break cut its Markdown row in two, `\\|` ended the cell early, and a name
    like `<img ...>` or `<!--` was HTML to a Markdown renderer (the runs table names every sweep)."""
    from analysis.check import read_markdown_table
    from analysis.tables import to_markdown

    names = ["a | b", "<img src=x onerror=alert(1)>", "back\\|slash\\", "two\n  lines", "ünï cödé"]
    path = tmp_path / "t.md"
    path.write_text(to_markdown(pd.DataFrame({"sweep": names, "seeds": ["1", "2", "3", "4", "5"]})))
    text = path.read_text()
    assert len(text.splitlines()) == 2 + len(names) and "<img" not in text.replace("\\<img", "")
    assert read_markdown_table(path)["sweep"].tolist() == [*names[:3], "two lines", names[4]]


def test_the_index_title_and_texts_are_not_html_to_a_markdown_renderer():
    """The index's title names the results folder and its texts name sweeps and settings: a `<` there
    was raw HTML in index.md (index.html escaped it)."""
    from analysis.report import _index_markdown, _Section

    text = _index_markdown("ablate report: results/<img src=x onerror=alert(1)>",
                           [_Section("Runs", "2 runs of sweep <!-- a: completed.")])
    assert "<img" not in text.replace("\\<img", "") and "<!--" not in text.replace("\\<!--", "")
    assert "\\<img src=x" in text and "sweep \\<!-- a" in text


# -- cost ---------------------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    frame = pd.DataFrame({"gmac": [1.0, 2.0, 2.0, 3.0, 0.5, 4.0, float("nan")],
                          "acc": [70.0, 80.0, 75.0, 80.0, 60.0, 90.0, 99.0]})
    # (2, 75) loses to (2, 80); (3, 80) loses to (2, 80); NaN is never on the front
    assert pareto_front(frame, "gmac", "acc").tolist() == [True, True, False, False, True, True, False]
    speed = pd.DataFrame({"speed": [100.0, 200.0, 200.0, 50.0], "acc": [80.0, 70.0, 70.0, 80.0]},
                         index=[10, 11, 12, 13])
    front = pareto_front(speed, "speed", "acc", x_better="higher")
    assert front.index.tolist() == [10, 11, 12, 13]
    assert front.tolist() == [True, True, True, False]  # equal points do not dominate each other
    assert pareto_front(frame.iloc[:0], "gmac", "acc").tolist() == []
    with pytest.raises(ValueError):
        pareto_front(frame, "gmac", "acc", x_better="smaller")


def test_pareto_fronts_compare_only_rows_of_one_context():
    """A CIFAR-10 row is not 'dominated' by a cheaper, more accurate Fashion-MNIST row: accuracies
    on different test data (or after other training) are not comparable."""
    table = pd.DataFrame({"data": ["fashion_mnist", "fashion_mnist", "cifar10", "fashion_mnist"],
                          "epochs": [3, 3, 3, 1], "train_size": [5000] * 4,
                          "gmac": [1.0, 2.0, 3.0, 4.0], "top1_mean": [90.0, 85.0, 60.0, 70.0]})
    assert pareto_front(table, "gmac", "top1_mean").tolist() == [True, False, False, False]
    assert pareto_fronts(table, "gmac", "top1_mean").tolist() == [True, False, True, True]


def test_throughput_fronts_compare_only_rows_timed_on_one_processor():
    """A CPU row is not 'dominated' by a GPU row that trains 50 times faster: the cost plot's
    throughput panel draws a front per processor (its GMAC panel one across them)."""
    table = pd.DataFrame({"data": "fashion_mnist", "epochs": 3, "train_size": 5000,
                          "timed_on": ["NVIDIA H200", *["AMD EPYC, AVX2, 2 threads"] * 2],
                          "train_samples_per_s": [40000.0, 900.0, 800.0], "top1_mean": [90.0, 85.0, 89.0]})
    # across machines the GPU row dominates both CPU rows; on the CPU, neither dominates the other
    assert pareto_fronts(table, "train_samples_per_s", "top1_mean", x_better="higher").tolist() == \
        [True, False, False]
    assert pareto_fronts(table, "train_samples_per_s", "top1_mean", x_better="higher",
                         within=("timed_on",)).tolist() == [True, True, True]


def test_the_cost_plot_draws_an_interval_inside_0_to_100(monkeypatch):
    """A 95% t-interval over few seeds can pass 100%: the bar stops at 100, as Figure 2's band does."""
    import analysis.cost as cost

    table = pd.DataFrame({"operator": ["dwconv", "local_mlp"], "model": "micro", "data": "fashion_mnist",
                          "settings": "", "epochs": 3, "train_size": 5000, "gmac": [0.01, 0.02],
                          "timed_on": "AMD EPYC, AVX2, 2 threads", "train_samples_per_s": [900.0, 800.0],
                          "top1_mean": [99.0, 90.0],
                          "ci_low": [97.0, 89.0], "ci_high": [101.5, 91.0]})
    monkeypatch.setattr(cost, "comparison_table", lambda runs, metric: table)
    fig = cost.plot_cost(pd.DataFrame())
    tops = [segment[:, 1].max() for ax in fig.axes for container in ax.containers
            for segment in container.lines[2][0].get_segments()]
    assert tops and max(tops) == 100.0 and 91.0 in tops


def test_cost_plot_files(report):
    assert (report / "cost.png").stat().st_size > 1000 and (report / "cost.pdf").stat().st_size > 1000


# -- weights ------------------------------------------------------------------------------------
def test_weight_variation_shows_the_axes(runs):
    static = weight_maps(run_path(runs, "dwconv"))
    dynamic = weight_maps(run_path(runs, "dynamic_dwconv"))
    attention = weight_maps(run_path(runs, "local_attention"))
    mlp = weight_maps(run_path(runs, "local_mlp"))
    assert static.weights.shape[:3] == (3, 32, 3)  # images, groups (depth-wise: 32), positions
    assert static.across_images < 1e-6 and static.across_positions < 1e-6
    assert dynamic.across_images > 1e-3 and dynamic.across_positions < 1e-6
    assert attention.across_images > 1e-3 and attention.across_positions > 1e-3
    assert mlp.across_images < 1e-6 and mlp.across_positions > 1e-3  # static, window-specific
    assert static.labels == dynamic.labels  # the same real test images for every run


def test_weight_variation_on_synthetic_maps():
    kernel = torch.randn(1, 1, 1, 3, 3)
    maps = torch.zeros(2, 1, 2, 8, 8)
    maps[:, :, 0, 1:4, 1:4] = kernel[0, 0, 0]  # the same kernel centred at (2, 2) and (5, 5)
    maps[:, :, 1, 4:7, 4:7] = kernel[0, 0, 0]
    assert weight_variation(maps, [(2, 2), (5, 5)], 1) == (0.0, 0.0)
    maps[1] *= 2  # the second image scales its kernels: images differ, positions do not
    images, positions = weight_variation(maps, [(2, 2), (5, 5)], 1)
    assert images > 0.1 and positions == 0.0


def test_report_files_and_index(report, runs):
    for name in ("figure2.png", "figure2.pdf", "comparison.md", "comparison.tex", "comparison.csv",
                 "cost.png", "cost.pdf", "axis_effects.md", "axis_effects.csv", "weights.png", "runs.md",
                 "runs.csv", "index.md", "index.html"):
        assert (report / name).stat().st_size > 0, name
    index = (report / "index.md").read_text()
    for name in ("figure2.png", "comparison.tex", "cost.png", "axis_effects.md", "weights.png", "runs.md"):
        assert f"({name})" in index
    page = (report / "index.html").read_text()
    assert page.count("<img ") == 3 and "<table>" in page  # figure 2, cost, weights
    runs_md = (report / "runs.md").read_text()
    assert "skipped" in runs_md and "attention needs spatial: none" in runs_md
    assert len(read_markdown(report / "runs.md")) == len(runs)
    assert select_weight_runs(runs)["operator"].tolist() == ["dwconv", "dynamic_dwconv", "local_attention",
                                                            "local_mlp"]


def test_report_cli_default_folder(mini_store, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert report_main([str(mini_store), "--no-weights"]) == 0
    assert (tmp_path / "reports" / Path(mini_store).name / "index.md").exists()
    assert "report written to" in capsys.readouterr().out


# -- W&B ------------------------------------------------------------------------------------------
def wandb_shaped(folder: Path, results: dict) -> SimpleNamespace:
    """A W&B API run as ablate.train fills it. No W&B server is reachable here, so the mapping is
    tested on dicts shaped like `wandb.Api().run(...)`'s `config` and `summary`, built from a real
    run folder exactly as the trainer builds them (training.py: nested config + `axes/*`; summary =
    `summary_of` the record), plus the keys W&B adds itself."""
    from ablate.config import spec_from_cfg
    from ablate.tracking.wandb_logger import summary_of

    cfg = OmegaConf.load(folder / "config.yaml")
    config = {**OmegaConf.to_container(cfg, resolve=True),
              **{f"axes/{k}": v for k, v in spec_from_cfg(cfg).axes.items()}}
    summary = summary_of(results)
    summary.update({"_runtime": 3.2, "_step": 9, "_timestamp": 1.7e9, "_wandb": {"runtime": 3}})
    return SimpleNamespace(config=config, summary=summary, name=results["run"], group=results["sweep"],
                           job_type=results["preset"], url=f"https://wandb.ai/me/ablate/runs/{results['run']}")


def test_wandb_mapping_equals_the_local_row(mini_store):  # noqa: F811
    checked = 0
    for record in read_records(mini_store):
        if record["status"] != "completed":
            continue
        folder = next(Path(mini_store).rglob(record["run"]))
        local = row_from_record(record, path=str(folder))
        remote = row_from_wandb_run(wandb_shaped(folder, record))
        assert remote.pop("path").startswith("https://wandb.ai/") and local.pop("path")
        for key, value in local.items():
            other = remote[key]
            both_nan = isinstance(value, float) and isinstance(other, float) and math.isnan(value) \
                and math.isnan(other)
            same = value == other or (value is None and other is None) or both_nan
            assert same, (record["run"], key, value, other)
        checked += 1
    assert checked == 12
    # a groups-based operator: the summary has no stage list, so cpg comes from width / groups
    record = {"status": "completed", "channels_per_group": None, "groups": 8}
    assert row_from_record(record, config={"model": {"embed_dim": 32}})["cpg"] == 4.0


def test_load_wandb_runs_queries_the_project_and_sweep(mini_store, monkeypatch):  # noqa: F811
    import wandb

    from analysis import load_wandb_runs

    records = [r for r in read_records(mini_store) if r["status"] == "completed"]
    fake = [wandb_shaped(next(Path(mini_store).rglob(r["run"])), r) for r in records]
    calls = []

    class FakeApi:  # wandb.Api().runs(path, filters) is all load_wandb_runs uses
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return fake

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr("analysis.wandb_source.server_problem", lambda: None)  # no server asked here
    frame = load_wandb_runs("ablate", entity="me", sweep="mini")
    assert calls == [("me/ablate", {"group": "mini"})]
    local = load_runs(mini_store)
    local = local[local["status"] == "completed"].set_index("run").sort_index()
    remote = frame.set_index("run").sort_index()
    columns = [c for c in local.columns if c != "path"]
    pd.testing.assert_frame_equal(remote[columns], local[columns])


def test_load_wandb_runs_without_a_server_says_so_at_once(monkeypatch):
    """With no server to answer, wandb.Api() waited about 30 s and then said it "failed to verify
    credentials" (the key was never the problem). The server is asked first (its /healthz, 5 s at
    most), and its absence is a ConnectionError naming it and the local store; no run is logged offline
    for it, and the next call asks again."""
    import wandb

    from ablate.tracking import wandb_logger
    from analysis import load_wandb_runs

    def no_api():
        raise AssertionError("wandb.Api() was called without a server")

    monkeypatch.setattr(wandb, "Api", no_api)
    monkeypatch.delenv(wandb_logger.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    for _ in range(2):
        with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9 cannot be reached.*load_runs"):
            load_wandb_runs("ablate", entity="me")
    assert wandb_logger.OFFLINE_ENV not in os.environ  # training in this process still asks for itself


# -- the committed demo, where there is one ---------------------------------------------------------
def test_demo_report_matches_results_demo():
    results, report = REPO / "results" / "demo", REPO / "reports" / "demo"
    if not (results.is_dir() and report.is_dir()):
        pytest.skip("no results/demo and reports/demo in this checkout (make demo writes them)")
    assert check_tables(results, report) > 0
    assert verify_comparison(results, report) > 0
    verify_effects(results, report)
    assert len(axis_effects(load_runs(results))) == len(read_csv(report / "axis_effects.csv"))
    assert len(comparison_table(load_runs(results))) == len(read_csv(report / "comparison.csv"))


def test_figures_carry_no_date(tmp_path):
    """No date in the files: re-rendering a report from the same runs leaves the committed one as is."""
    from analysis.plotting import new_figure, save_figure

    fig = new_figure((3, 2))
    fig.add_subplot().plot([0, 1, 2], [1, 0, 2])
    first = save_figure(fig, tmp_path / "a" / "fig")
    assert b"/CreationDate" not in first[1].read_bytes()  # matplotlib writes the time of saving
    second = save_figure(fig, tmp_path / "b" / "fig")
    for one, two in zip(first, second):
        assert one.read_bytes() == two.read_bytes(), one.name
