"""Fair tuning (hydra.sweeper.tune): each cell at its own learning rate, chosen on validation with one
seed, trained with every seed; resumable; the report's selection curve and chosen runs.

The planning rules on their own, then one real tuned sweep through `python -m ablate.train -m`."""
from __future__ import annotations

import math

import pytest
from test_sweep import TINY, records, run_sweep

from ablate.sweep.tuning import TuningPlan, parse_tuning
from ablate.tracking.tuning import read_tuning
from analysis.report import main as report_main
from analysis.tuning import report_runs, selection_table


# -- the rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tune,message", [
    ({"values": [0.1]}, "at least two different values"),
    ({"values": [0.1, 0.1]}, "at least two different values"),
    ({"values": [0.1, 0.2], "metric": "final_test_top1"}, "a validation number"),
    ({"values": [0.1, 0.2], "seed": "zero"}, "must be an integer"),
    ({"values": [0.1, 0.2], "setting": "trainer.seed"}, "other than the seed"),
    ({"values": [0.1, 0.2], "lr": 1}, "unknown key"),
    ({"values": [0.1, 0.2], "followers": {"grids": [{"operator": "dwconv"}]}}, "followers.by must name"),
    ({"values": [0.1, 0.2], "followers": {"by": "operator", "grids": []}}, "followers.grids must be a list"),
    ({"values": [0.1, 0.2], "followers": {"by": "operator", "grids": [{"model": "tiny"}]}},
     "every grid sets operator"),
    ({"values": [0.1, 0.2], "followers": {"by": "operator", "grids": [{"operator": "dw", "optim.lr": 1}]}},
     "never optim.lr"),
])
def test_a_bad_tune_names_its_key(tune, message):
    with pytest.raises(ValueError, match=message):
        parse_tuning(tune)


@pytest.mark.parametrize("text", ['{"setting": "optim.lr", "cel', "[]", '{"cells": 3}'])
def test_a_damaged_tuning_record_stops_the_report_naming_it(tmp_path, capsys, text):
    # read as "not a tuned sweep", it put every candidate rate into the tables, silently
    (tmp_path / "tuning.json").write_text(text)
    with pytest.raises(ValueError, match="tuning.json is damaged"):
        read_tuning(tmp_path)
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-weights"]) == 2
    assert "Launch the tuned sweep's command again" in capsys.readouterr().err
    assert read_tuning(tmp_path / "untuned") is None  # no file: a sweep that was not tuned


def test_the_plan_selects_with_one_seed_then_trains_every_seed_at_the_best_value():
    tuning = parse_tuning({"values": "0.001,0.01,0.1", "seed": 0})
    jobs = [[f"operator={op}", f"trainer.seed={s}"] for op in ("dwconv", "local_mlp") for s in (0, 1, 2)]
    plan = TuningPlan(tuning, jobs)
    selection = plan.selection_jobs()
    assert len(selection) == 6 and all(j[-1] == "trainer.seed=0" for j in selection)
    scores = {("dwconv", "0.001"): 50.0, ("dwconv", "0.01"): 70.0, ("dwconv", "0.1"): None,  # diverged
              ("local_mlp", "0.001"): 60.0, ("local_mlp", "0.01"): 60.0, ("local_mlp", "0.1"): 10.0}

    def record_of(job):
        key = (job[0].split("=")[1], job[1].split("=")[1])
        score = scores[key]
        return ({"status": "diverged"} if score is None else
                {"status": "completed", "final_val_top1": score, "experiment": "-".join(key), "run": "r"})

    plan.choose(record_of)
    chosen = {c.overrides[0]: c.chosen for c in plan.cells.values()}
    assert chosen == {"operator=dwconv": "0.01", "operator=local_mlp": "0.001"}  # a tie keeps the earlier
    final = plan.final_jobs()
    assert sorted(map(tuple, final)) == sorted(
        (f"operator={op}", f"optim.lr={lr}", f"trainer.seed={s}")
        for op, lr in (("dwconv", "0.01"), ("local_mlp", "0.001")) for s in (0, 1, 2))
    with pytest.raises(ValueError, match="optim.lr is chosen by hydra.sweeper.tune"):
        TuningPlan(tuning, [["operator=dwconv", "optim.lr=0.1"]])


def test_followers_take_the_value_chosen_for_their_operator():
    tuning = parse_tuning({"values": [0.001, 0.01], "followers": {
        "by": ["operator"], "grids": [{"operator": "local_mlp", "sharing.channels_per_group": "1,4"}]}})
    plan = TuningPlan(tuning, [["operator=dwconv"], ["operator=local_mlp"]])
    lr = {"dwconv": 0.001, "local_mlp": 0.01}
    plan.choose(lambda job: {"status": "completed", "final_val_top1": 1.0 if float(job[1].split("=")[1])
                             == lr[job[0].split("=")[1]] else 0.0})
    jobs, left_out = plan.follower_jobs([["operator=local_mlp", "sharing.channels_per_group=1"],
                                         ["operator=local_mlp", "sharing.channels_per_group=4"]])
    assert jobs == [["operator=local_mlp", "sharing.channels_per_group=1", "optim.lr=0.01"],
                    ["operator=local_mlp", "sharing.channels_per_group=4", "optim.lr=0.01"]] and not left_out
    with pytest.raises(ValueError, match="no tuned cell has operator=token_mlp"):
        plan.follower_jobs([["operator=token_mlp"]])
    plan.choose(lambda job: {"status": "failed"})  # nothing chosen: the followers wait with their cell
    assert plan.follower_jobs([["operator=dwconv", "model=tiny"]]) == ([], ["operator=dwconv model=tiny"])


def test_a_cell_without_a_completed_selection_run_is_not_trained_further():
    plan = TuningPlan(parse_tuning({"values": [0.1, 0.2]}), [["operator=dwconv"]])
    plan.choose(lambda job: {"status": "failed"})
    assert plan.final_jobs() == [] and plan.untunable() == ["operator=dwconv"]


# -- a real tuned sweep -------------------------------------------------------------------------------
# followers: dwconv at 2 channels per group at dwconv's chosen rate (2 new runs: seeds 0, 1), and
# dynamic_dwconv at its preset's 1 channel per group: its final runs, not trained again
FOLLOWERS = ("followers:{by:[operator],grids:[{operator:dwconv,sharing.channels_per_group:2},"
             "{operator:dynamic_dwconv,sharing.channels_per_group:1}]}")
# the tuned operators as a grid: on the command line, `operator=` would win over the followers' own
TUNED = ['hydra.sweeper.grids=[{operator:"dwconv,dynamic_dwconv"}]', "trainer.seed=0,1",
         f"hydra.sweeper.tune={{values:[0.0005,0.02],{FOLLOWERS}}}", "trainer.sweep=tuned", *TINY]


def test_a_tuned_sweep_chooses_on_validation_resumes_and_reports_the_chosen_runs(tmp_path):
    code, out = run_sweep(tmp_path, *TUNED, timeout=900)
    assert code == 0, out[-3000:]
    folder = tmp_path / "tuned"
    tuning = read_tuning(folder)
    done = records(folder)
    assert len(done) == 8, sorted(done)  # 2 cells x 2 rates, seed 0; seed 1 at each chosen rate; 2 followers
    lines = [line for line in out.splitlines() if "jobs of the sweep done" in line]
    assert "[sweep tuned followers]" in lines[-1] and "8/8 jobs of the sweep done" in lines[-1], lines[-3:]
    dwconv = next(c["chosen"] for c in tuning["cells"] if "operator=dwconv" in c["overrides"])
    followers = [r for r in done.values() if r["identity"]["sharing"]["channels_per_group"] == 2]
    assert sorted(r["seed"] for r in followers) == [0, 1]
    assert all(r["preset"] == "dwconv" and r["identity"]["optim"]["lr"] == dwconv for r in followers)
    for cell in tuning["cells"]:
        scores = {c["value"]: c["score"] for c in cell["candidates"]}
        assert cell["chosen"] == max(scores, key=lambda v: (scores[v], -list(scores).index(v)))
        for candidate in cell["candidates"]:  # the score is the record's validation top-1
            record = done[candidate["run"]]
            assert record["seed"] == 0 and math.isclose(record["final_val_top1"], candidate["score"])
        chosen_runs = [r for r in done.values() if r["experiment"] == cell["chosen_experiment"]]
        assert sorted(r["seed"] for r in chosen_runs) == [0, 1]
        assert all(r["identity"]["optim"]["lr"] == cell["chosen"] for r in chosen_runs)

    again_code, again = run_sweep(tmp_path, *TUNED, timeout=600)  # relaunched: nothing left to train
    assert again_code == 0 and again.count("0 to run") == 3, again[-2000:]
    assert read_tuning(folder) == tuning

    every, used, _ = report_runs(folder)
    assert len(every) == 8 and len(used) == 6 and used["seed"].tolist().count(1) == 3
    table = selection_table(every, tuning)
    assert len(table) == 4 and table["chosen"].sum() == 2
    out_dir = tmp_path / "report"
    assert report_main([str(folder), "--out", str(out_dir), "--no-weights"]) == 0
    index = (out_dir / "index.md").read_text()
    assert "Selection of optim.lr" in index and (out_dir / "selection.png").is_file()
    comparison = (out_dir / "comparison.md").read_text()
    assert comparison.count("| 2 seeds |") == 3  # one row per operator at its chosen rate, + the follower
    claims = (out_dir / "claims.csv").read_text()
    assert "dynamic_beats_static" in claims and "not in this store" in claims
    dynamic = [line for line in (out_dir / "claims.md").read_text().splitlines() if "Dynamic" in line][0]
    assert "2 seeds" in dynamic  # paired across the two chosen rates
