"""Comparisons you can trust: a table pools only the seeds of one experiment, says how sure it is,
and survives damaged records. Intervals are checked against scipy, computed here independently."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mini_store import REPO, mini_store  # noqa: F401  (the session fixture)
from scipy import stats

from analysis import axis_effects, comparison_table, figure2_data, load_runs, plot_figure2
from analysis.comparison import printed_comparison
from analysis.effects import printed_effects
from analysis.experiments import distinguishing_settings
from analysis.report import main as report_main
from analysis.stats import paired_difference, seeds_to_resolve, t_interval

pytestmark = pytest.mark.xdist_group("mini_store")

LR_SWEEP = ["optim.lr=1e-4,1e-2", "data.train_subset=500", "schedule.epochs=1", "logger=none",
            "data.test_subset=500", "data.val_size=500", "trainer.quiet=true", "trainer.threads=1"]


def train_sweep(root: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "ablate.train", "-m", *LR_SWEEP, *overrides,
               f"trainer.results_root={root}"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def lr_store(tmp_path_factory) -> Path:
    """The README's trap: one operator at two learning rates, seeds 0, 1, 2 (6 real runs)."""
    root = tmp_path_factory.mktemp("lr")
    train_sweep(root, "trainer.seed=0,1,2")
    return root / "runs"


def copy_runs(store: Path, to: Path, keep) -> Path:
    for results in store.rglob("results.json"):
        record = json.loads(results.read_text())
        if keep(record):
            shutil.copytree(results.parent, to / results.parent.name)
    return to


# -- one experiment per row ---------------------------------------------------------------------
def test_two_learning_rates_are_two_rows_that_name_the_rate(lr_store, tmp_path):
    one_seed = load_runs(copy_runs(lr_store, tmp_path / "seed0", lambda r: r["seed"] == 0))
    table = comparison_table(one_seed)
    assert len(table) == 2  # main pooled them into one row of "2 seeds"
    printed = printed_comparison(table)
    assert sorted(printed["settings"]) == ["optim.lr=0.0001", "optim.lr=0.01"]
    assert list(printed["seeds"]) == ["1 seed", "1 seed"]
    assert list(printed["95% CI"]) == ["1 seed: no interval"] * 2  # never a fake ± 0
    assert table["ci_low"].isna().all()


def test_runs_of_another_number_of_processes_are_another_row(lr_store, tmp_path):
    """data.batch_size is per process: a 2-process seed trained with twice the global batch. Its
    record says so (world_size); it must not be pooled with the 1-process seeds as one more seed."""
    import hashlib

    store = copy_runs(lr_store, tmp_path / "store", lambda r: r["identity"]["optim"]["lr"] == 1e-4)
    for results in store.rglob("results.json"):
        record = json.loads(results.read_text())
        if record["seed"] == 2:  # as torchrun with 2 processes would have recorded it
            results.write_text(json.dumps({**record, "world_size": 2}))
            (results.parent / "results.sha256").write_text(hashlib.sha256(results.read_bytes()).hexdigest())
    table = comparison_table(load_runs(store))
    assert sorted(table["seeds"]) == [1, 2]
    assert sorted(printed_comparison(table)["settings"]) == ["", "processes=2"]


def test_three_seeds_give_scipys_t_interval(lr_store):
    runs = load_runs(lr_store)
    table = comparison_table(runs)
    assert len(table) == 2 and list(printed_comparison(table)["seeds"]) == ["3 seeds", "3 seeds"]
    for _, row in table.iterrows():
        lr = float(row["settings"].split("=")[1])
        accuracies = [json.loads(p.read_text())["final_test_top1"] for p in lr_store.rglob("results.json")
                      if json.loads(p.read_text())["identity"]["optim"]["lr"] == lr]
        assert len(accuracies) == 3
        low, high = stats.t.interval(0.95, 2, loc=np.mean(accuracies), scale=stats.sem(accuracies))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-9)
        assert row["top1_mean"] == pytest.approx(np.mean(accuracies), abs=1e-12)


def test_settings_are_named_only_where_no_column_shows_them():
    base = {"preset": "dwconv", "model.size": "micro", "model.depths": (1, 1, 3, 1), "optim.lr": 1e-3}
    tiny = {**base, "model.size": "tiny", "model.depths": (2, 2, 6, 2)}
    # a model column stands for the model's settings; nothing stands for the learning rate
    assert distinguishing_settings([base, tiny], {"model": ["micro", "tiny"]}) == ["", ""]
    other_lr = {**base, "optim.lr": 1e-2}
    assert distinguishing_settings([base, other_lr, tiny], {"model": ["micro", "micro", "tiny"]}) == \
        ["optim.lr=0.001", "optim.lr=0.01", "optim.lr=0.001"]
    # a model override that the model's name does not show is named
    deeper = {**base, "model.depths": (1, 1, 6, 1)}
    assert distinguishing_settings([base, deeper], {"model": ["micro", "micro"]}) == \
        ["model.depths=[1,1,3,1]", "model.depths=[1,1,6,1]"]


def synthetic(record: dict, run: str, **settings) -> dict:
    """A copy of a real record as another experiment: its identity changed, its key recomputed."""
    from ablate.tracking.identity import experiment_key

    record = json.loads(json.dumps(record))
    for dotted, value in settings.items():
        *group, key = dotted.split(".")
        (record["identity"][group[0]] if group else record["identity"])[key] = value
    record["experiment"] = experiment_key(record["identity"])
    record["run"] = run
    return record


def write_store(root: Path, records: list[dict]) -> Path:
    for record in records:
        (root / record["run"]).mkdir(parents=True)
        (root / record["run"] / "results.json").write_text(json.dumps(record))  # no sha256: trusted
    return root


def test_an_axis_pair_differs_in_its_axis_and_nothing_else(mini_store, tmp_path):  # noqa: F811
    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    records = [r for r in records
               if r["status"] == "completed" and r["preset"] in ("dwconv", "dynamic_dwconv")]
    assert len(records) == 4
    # the same two operators again at another learning rate, and dwconv alone at a third
    again = [synthetic(r, f"{r['run']}-lr", **{"optim.lr": 1e-2}) for r in records]
    alone = [synthetic(r, f"{r['run']}-lr3", **{"optim.lr": 3e-3})
             for r in records if r["preset"] == "dwconv"]
    runs = load_runs(write_store(tmp_path / "store", records + again + alone))
    effects = axis_effects(runs)
    # two pairs (one per learning rate); dwconv at 3e-3 has no partner; no pair across rates
    assert len(effects) == 2 and set(effects["axis"]) == {"dynamic"}
    assert sorted(effects["settings"]) == ["optim.lr=0.006", "optim.lr=0.01"]
    assert len(comparison_table(runs)) == 5
    printed = printed_effects(effects)
    assert {"95% CI", "verdict", "seeds to resolve", "settings"} <= set(printed.columns)



def test_an_axis_pair_says_which_seeds_it_could_not_pair(mini_store, tmp_path):  # noqa: F811
    """dwconv has seeds 0, 1 and 7; dynamic_dwconv 0, 1 and 8: two pairs, and two seeds left out that
    the row counts (they were dropped unsaid); at another rate no seed is shared: a row of 0 pairs
    (it vanished)."""
    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    records = [r for r in records
               if r["status"] == "completed" and r["preset"] in ("dwconv", "dynamic_dwconv")]
    extra = [synthetic(r, f"{r['run']}-extra") for r in records if r["seed"] == 0]
    for r in extra:
        r["seed"] = r["identity"]["seed"] = 7 if r["preset"] == "dwconv" else 8
    apart = [synthetic(r, f"{r['run']}-lr", **{"optim.lr": 1e-2}) for r in records]
    for r in apart:
        if r["preset"] == "dynamic_dwconv":
            r["seed"] = r["identity"]["seed"] = r["seed"] + 10
    effects = axis_effects(load_runs(write_store(tmp_path / "store", records + extra + apart)))
    effects = effects.sort_values("settings").reset_index(drop=True)
    assert list(effects["pairs"]) == [2, 0] and list(effects["unpaired"]) == [2, 4]
    printed = printed_effects(effects)
    assert list(printed["paired seeds"]) == ["2 seeds (2 unpaired left out)", "0 seeds (4 unpaired left out)"]
    assert printed["verdict"].iloc[1] == "unresolved"
    assert printed["seeds to resolve"].iloc[1] == "needs paired seeds"
    assert np.isclose(effects["delta_params_m"].iloc[1], effects["delta_params_m"].iloc[0])

def test_a_bf16_twin_is_a_precision_flip_paired_by_seed(mini_store, tmp_path):  # noqa: F811
    """The same experiment in bf16 pairs with its default (auto) twin as a `precision` flip, seed by
    seed; bf16 runs of two operators do not pair across operators and precisions at once."""
    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    records = [r for r in records
               if r["status"] == "completed" and r["preset"] in ("dwconv", "dynamic_dwconv")]
    twins = []
    for r in records:
        twin = synthetic(r, f"{r['run']}-bf16", precision="bf16")
        twin["final_test_top1"] = r["final_test_top1"] - (0.5 if r["seed"] == 0 else 0.7)
        twins.append(twin)
    effects = axis_effects(load_runs(write_store(tmp_path / "store", records + twins)))
    flips = effects[effects["axis"] == "precision"]
    assert len(flips) == 2 and set(flips["from"]) == {"auto"} and set(flips["to"]) == {"bf16"}
    assert sorted(flips["from_operator"]) == sorted(flips["to_operator"])
    assert all(flips["pairs"] == 2) and np.allclose(flips["delta_top1_mean"], -0.6)
    assert len(effects[effects["axis"] == "dynamic"]) == 2  # dwconv -> dynamic in each precision
    assert "precision" in set(printed_effects(effects)["axis"])


def _dw_records(mini_store) -> list[dict]:  # noqa: F811
    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    return sorted((r for r in records
                   if r["status"] == "completed" and r["preset"] in ("dwconv", "dynamic_dwconv")),
                  key=lambda r: (r["preset"], r["seed"]))


def test_runs_record_the_processor_and_the_precision_they_computed_in(mini_store):  # noqa: F811
    import re

    import torch

    from ablate.distributed import processor

    here = processor(torch.device("cpu"))  # "AMD EPYC, AVX2, 2 threads"
    threads = torch.get_num_threads()
    assert re.fullmatch(rf".+, {torch.backends.cpu.get_cpu_capability()}, {threads} threads?", here)
    for record in _dw_records(mini_store):  # trained with the threads the test store gives a job
        assert re.fullmatch(re.escape(here.rsplit(", ", 1)[0]) + r", \d+ threads?", record["processor"])
        assert record["precision_used"] == "fp32"  # trainer.precision=auto on a CPU


def test_an_auto_run_on_a_gpu_is_a_bf16_run_never_a_seed_of_the_cpu_runs(mini_store, tmp_path):  # noqa: F811
    """trainer.precision=auto trains in fp32 on a CPU and under bf16 autocast on a GPU, and is not
    part of the identity (a sweep plans before it knows the device): a GPU seed of a CPU experiment
    was pooled as one more seed. It is the explicit bf16 run's experiment, named where rows differ."""
    dwconv = [r for r in _dw_records(mini_store) if r["preset"] == "dwconv"]
    on_gpu = synthetic(dwconv[0], "gpu-seed-5")
    on_gpu.update(seed=5, device="cuda:0", processor="NVIDIA H200", final_test_top1=50.0)
    del on_gpu["precision_used"]  # a record made before it said so: its device tells
    on_gpu["identity"]["seed"] = 5
    explicit = synthetic(dwconv[0], "bf16-seed-6", precision="bf16")
    explicit.update(seed=6, final_test_top1=52.0)
    explicit["identity"]["seed"] = 6
    table = comparison_table(load_runs(write_store(tmp_path / "store", [*dwconv, on_gpu, explicit])))
    assert sorted(table["seeds"]) == [2, 2]
    bf16 = table[table["settings"] == "precision=bf16"]
    assert len(bf16) == 1 and bf16["top1_mean"].iloc[0] == 51.0
    assert sorted(printed_comparison(table)["settings"]) == ["", "precision=bf16"]
    assert math.isnan(bf16["train_samples_per_s"].iloc[0])  # timed on an H200 and on the CPU: no mean
    # alone, the CPU seeds are as they were: no setting added, the recorded experiment key
    cpu_only = comparison_table(load_runs(write_store(tmp_path / "cpu", dwconv)))
    assert list(cpu_only["experiment"]) == [dwconv[0]["experiment"]]
    assert "settings" not in printed_comparison(cpu_only).columns


def test_speeds_are_averaged_and_compared_only_per_processor(mini_store, tmp_path):  # noqa: F811
    """Accuracy pools over machines, throughput does not: seeds timed on two processors have no mean
    speed, rows timed on different ones say which, and a speed ratio pairs seeds of one processor."""
    records = _dw_records(mini_store)  # dwconv seeds 0, 1 and dynamic_dwconv seeds 0, 1
    plain = load_runs(write_store(tmp_path / "plain", records))
    plain_columns = list(printed_comparison(comparison_table(plain)).columns)
    same = json.loads(json.dumps(records))
    for r in same:
        r["processor"] = "CPU A, AVX2, 2 threads"
    table = comparison_table(load_runs(write_store(tmp_path / "same", same)))
    assert list(printed_comparison(table).columns) == plain_columns  # one processor: nothing to say
    assert set(table["timed_on"]) == {"CPU A, AVX2, 2 threads"}

    mixed = json.loads(json.dumps(same))
    dw1 = next(r for r in mixed if r["preset"] == "dwconv" and r["seed"] == 1)
    dw1["processor"] = "CPU B, AVX512, 16 threads"
    runs = load_runs(write_store(tmp_path / "mixed", mixed))
    table = comparison_table(runs).set_index("operator")
    assert table.loc["dwconv", "timed_on"] == "2 processors"
    assert math.isnan(table.loc["dwconv", "train_samples_per_s"])
    assert math.isnan(table.loc["dwconv", "inference_samples_per_s"])
    dynamic = [r for r in mixed if r["preset"] == "dynamic_dwconv"]
    assert table.loc["dynamic_dwconv", "train_samples_per_s"] == pytest.approx(
        np.mean([r["train_samples_per_s"] for r in dynamic]))
    assert table.loc["dwconv", "top1_mean"] == pytest.approx(  # accuracy still pools both seeds
        np.mean([r["final_test_top1"] for r in mixed if r["preset"] == "dwconv"]))
    printed = printed_comparison(comparison_table(runs)).set_index("operator")
    assert list(printed.columns).index("timed on") == list(printed.columns).index("train img/s") - 1
    assert printed.loc["dwconv", "timed on"] == "2 processors"
    assert printed.loc["dwconv", "train img/s"] == "n/a"
    assert printed.loc["dynamic_dwconv", "timed on"] == "CPU A, AVX2, 2 threads"

    effects = axis_effects(runs)
    row = effects[effects["axis"] == "dynamic"].iloc[0]
    dw0 = next(r for r in mixed if r["preset"] == "dwconv" and r["seed"] == 0)
    dyn0 = next(r for r in dynamic if r["seed"] == 0)
    assert row["pairs"] == 2  # both seeds pair for accuracy, only seed 0 for speed
    assert row["speed_ratio"] == pytest.approx(dyn0["train_samples_per_s"] / dw0["train_samples_per_s"])


def test_the_data_scale_figure_is_a_line_per_operator_over_training_images(mini_store, tmp_path):  # noqa: F811
    """Runs that differ only in data.train_subset form one line per operator, x = the images trained
    on, the band scipy's t-interval over the seeds; another learning rate is another line."""
    from analysis.data_scale import data_scale_data, plot_data_scale

    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    default_cpg = {"dwconv": 1, "local_mlp": 32}  # the presets as defined, not the Figure-2 variants
    records = [r for r in records if r["status"] == "completed" and r["preset"] in default_cpg
               and r["identity"]["sharing"]["channels_per_group"] == default_cpg[r["preset"]]]
    sized = []
    for r in records:
        for size, bonus in ((300, -5.0), (1200, 5.0)):
            twin = synthetic(r, f"{r['run']}-n{size}", **{"data.train_subset": size})
            # a seed's own offset (not a multiple of the 0.2 steps of 500 test images): seeds that the
            # one-epoch runs leave at one accuracy (both at chance) still have a spread to interval
            twin["train_size"] = size
            twin["final_test_top1"] = r["final_test_top1"] + bonus + 0.37 * r["seed"]
            sized.append(twin)
    lr = [synthetic(t, f"{t['run']}-lr", **{"optim.lr": 1e-2}) for t in sized if t["preset"] == "dwconv"]
    runs = load_runs(write_store(tmp_path / "store", records + sized + lr))
    data = data_scale_data(runs)
    lines = sorted(data["line"].unique())
    assert lines == ["dwconv (optim.lr=0.006)", "dwconv (optim.lr=0.01)", "local_mlp (optim.lr=0.006)"]
    original = {r["preset"]: r["train_size"] for r in records}
    dw = data[data["line"] == "dwconv (optim.lr=0.006)"].sort_values("train_size")
    assert dw["train_size"].tolist() == sorted([300.0, 1200.0, float(original["dwconv"])])
    top = dw.iloc[-1] if original["dwconv"] > 1200 else dw[dw["train_size"] == 1200].iloc[0]
    values = np.array(top["values"])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert np.isclose(top["ci_low"], low) and np.isclose(top["ci_high"], high) and top["seeds"] == 2
    assert plot_data_scale(runs, tmp_path / "data_scale") is not None
    assert (tmp_path / "data_scale.png").is_file()


def test_figure2_lines_split_by_setting_and_bands_only_with_two_seeds(mini_store, tmp_path):  # noqa: F811
    records = [json.loads(p.read_text()) for p in Path(mini_store).rglob("results.json")]
    mlp = [r for r in records if r["status"] == "completed" and r["preset"] == "local_mlp"]
    assert len(mlp) == 6  # cpg 1, 8, 32 x seeds 0, 1
    other = [synthetic(r, f"{r['run']}-lr", **{"optim.lr": 1e-2}) for r in mlp if r["seed"] == 0]
    runs = load_runs(write_store(tmp_path / "store", mlp + other))
    data = figure2_data(runs)
    assert sorted(data["line"].unique()) == ["local_mlp (optim.lr=0.006)", "local_mlp (optim.lr=0.01)"]
    one_seed = data[data["line"].str.contains("0.01")]
    assert one_seed["ci_low"].isna().all() and (one_seed["seeds"] == 1).all()
    fig = plot_figure2(runs)
    bands = [c for c in fig.axes[0].collections if type(c).__name__ == "FillBetweenPolyCollection"]
    drawn = [len(b.get_paths()) > 0 and any(len(p.vertices) > 0 for p in b.get_paths()) for b in bands]
    assert drawn == [True, False]  # the 2-seed line has a band, the 1-seed line none


# -- statistics ---------------------------------------------------------------------------------
def test_intervals_are_scipys():
    values = [81.2, 80.4, 82.9, 81.7]
    interval = t_interval(values)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)
    assert math.isnan(t_interval([80.0]).low)
    before, after = np.array([80.1, 81.0, 79.5]), np.array([80.9, 81.3, 80.6])
    difference = paired_difference(after - before)
    ci = stats.ttest_rel(after, before).confidence_interval(0.95)
    assert (difference.interval.low, difference.interval.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert difference.verdict == ("resolved" if ci.low > 0 or ci.high < 0 else "unresolved")


def test_seeds_to_resolve_is_the_first_count_with_80_percent_power():
    mean, std = 0.25, 0.57  # the axis-effect row that printed "-0.25 ± 0.57" over 2 pairs
    n = int(seeds_to_resolve(mean, std))

    def power(k):
        critical = stats.t.ppf(0.975, k - 1)
        return stats.nct.sf(critical, k - 1, mean / std * math.sqrt(k))

    assert power(n) >= 0.8 > power(n - 1)
    assert 35 <= n <= 50
    unresolved = paired_difference([-0.25 - 0.4, -0.25 + 0.4])
    assert unresolved.verdict == "unresolved" and unresolved.seeds_needed > 2
    one_pair = paired_difference([0.5])
    assert one_pair.verdict == "unresolved" and math.isnan(one_pair.seeds_needed)
    assert seeds_to_resolve(0.0, 1.0) == math.inf



def test_differences_without_spread_resolve_nothing():
    # accuracies are counts over a test set, so two seeds can differ by exactly as much: the t-interval
    # then has no width and excluded 0, "resolved" by a tie; and "2 seeds" would resolve it
    tied = paired_difference([0.5, 0.5, 0.5])
    assert (tied.interval.low, tied.interval.high) == (0.5, 0.5)
    assert tied.verdict == "unresolved" and math.isnan(tied.seeds_needed)
    assert math.isnan(seeds_to_resolve(0.5, 0.0)) and math.isnan(seeds_to_resolve(0.0, 0.0))

# -- damaged records ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_completed_record_with_a_number_that_is_not_finite_is_unreadable(tmp_path, value):
    # json writes NaN and Infinity; a mean skips NaN silently, so such a seed vanished from its row
    # ("2 seeds" of 3 records) while the report said every record was read
    from analysis.records import read_record

    record = {"status": "completed", "run": "r", "preset": "dwconv", "operator": "dwconv", "model": "micro",
              "data": "fashion_mnist", "block": "dwnet", "seed": 0, "epochs": 1, "epochs_done": 1,
              "params_m": 1.2, "gmac": 0.01, "experiment": "e", "identity": {"preset": "dwconv"},
              "final_test_top1": 80.0}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(record))
    assert read_record(path) == (record, None)
    for key in ("final_test_top1", "best_val_top1"):  # the row's number, and one it only shows
        path.write_text(json.dumps(record).replace('"final_test_top1": 80.0', f'"{key}": {value}')
                        if key == "final_test_top1" else json.dumps(record)[:-1] + f', "{key}": {value}}}')
        found, reason = read_record(path)
        assert found is None and f"{key!r} is {float(value)!r}, not a finite number" in reason, reason


def test_a_store_with_damaged_records_still_reports_and_lists_them(mini_store, tmp_path, capsys):  # noqa: F811
    store = tmp_path / "store"
    shutil.copytree(mini_store, store)
    good = sorted(store.rglob("results.json"))
    completed = [p for p in good if json.loads(p.read_text())["status"] == "completed"]
    damage = (
        lambda r: {k: v for k, v in r.items() if k != "final_test_top1"},  # a missing key
        lambda r: [r],  # a JSON list
        lambda r: {**r, "seed": "zero", "gmac": "fast"},  # wrong types
    )
    for change, path in zip(damage, completed):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        (path.parent / "results.sha256").unlink()  # as a person would leave it: no checksum to fail
    truncated = completed[3]
    truncated.write_bytes(truncated.read_bytes()[:200])
    edited = completed[4]  # a changed number that still parses: caught by its sha256
    record = json.loads(edited.read_text())
    record["final_test_top1"] += 5
    edited.write_text(json.dumps(record, indent=2) + "\n")

    out = tmp_path / "report"
    code = report_main([str(store), "--out", str(out), "--no-weights"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith(f"5 of {len(good)} records left out as unreadable")
    runs_md = (out / "runs.md").read_text()
    for reason in ("missing key 'final_test_top1'", "holds a JSON list", "'seed' is 'zero', not an integer",
                   "not valid JSON", "sha256 disagrees"):
        assert reason in runs_md, reason
    assert runs_md.count("| unreadable |") == 5
    runs = load_runs(store)
    assert len(runs) == len(good) and (runs["status"] == "unreadable").sum() == 5
    left = comparison_table(runs)["seeds"].sum()
    assert left == len(completed) - 5  # the damaged ones are in no table
    assert (out / "comparison.md").exists() and (out / "index.md").exists()
