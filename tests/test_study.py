"""`make study` (sweeps/study.yaml): the plan answers every claim of analysis/claims.yaml and draws every
figure it promises, with at least three seeds per cell, before two hours of training are spent on it.

The sweep itself is the tuned sweep of tests/test_tuning.py (selection, final, followers; resumable);
here its file is composed by Hydra and expanded as the sweeper expands it, without training."""
from __future__ import annotations

from collections import defaultdict

from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR
from ablate.space.presets import PRESETS
from ablate.sweep.plan import expand_grids
from ablate.sweep.tuning import TuningPlan, parse_tuning
from analysis.claims import load_claims


def study_jobs():
    """(final jobs as {setting: value} with the tuned rate left out, the tuning) of sweeps/study.yaml."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["sweeps=study"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    tuning = parse_tuning(sweeper.tune)
    params = dict(sweeper.params)
    plan = TuningPlan(tuning, expand_grids([], params, [dict(g) for g in sweeper.grids]))
    for cell in plan.cells.values():
        cell.chosen = tuning.values[0]  # any choice: which one does not change what is planned
    followers, _ = plan.follower_jobs(expand_grids([], params, tuning.follow_grids))
    jobs = [dict(o.split("=", 1) for o in job if not o.startswith(tuning.setting + "="))
            for job in plan.final_jobs() + followers]
    return cfg, jobs, tuning


def _cells(jobs):
    seeds = defaultdict(set)
    for job in jobs:
        seeds[tuple(sorted((k, v) for k, v in job.items() if k != "trainer.seed"))].add(job["trainer.seed"])
    return seeds


def test_every_cell_of_the_study_has_three_seeds_and_its_own_rate():
    cfg, jobs, tuning = study_jobs()
    assert cfg.model.size.name == "micro" and cfg.trainer.sweep == "study"  # the default small model
    assert tuning.setting == "optim.lr" and tuning.metric.endswith("val_top1") and len(tuning.values) >= 3
    assert all(len(seeds) >= 3 for seeds in _cells(jobs).values())


def test_the_study_holds_both_sides_of_every_claim_at_its_main_budget():
    _, jobs, _ = study_jobs()
    main = [j for j in jobs if "data.train_subset" not in j]  # the sweep's own training-set size

    def default_cpg(operator):
        cpg = PRESETS[operator].spec.sharing.channels_per_group
        return None if cpg is None else str(cpg)

    have = {(j["operator"], j.get("sharing.channels_per_group", default_cpg(j["operator"]))) for j in main}
    for claim in load_claims():
        if claim.metric not in ("top1", "top5"):  # the detection and segmentation claims: make downstream
            continue
        for side in claim.sides:
            extra = set(side) - {"operator", "sharing.channels_per_group"}
            assert not extra, f"the study test knows no side setting {extra}: extend it with the claims"
            cpg = side.get("sharing.channels_per_group")
            wanted = (side["operator"], default_cpg(side["operator"]) if cpg is None else str(cpg))
            assert wanted in have, f"claim {claim.id}: the study trains no {wanted}"


def test_the_study_draws_figure_2_for_both_operators_and_a_data_scale_curve():
    _, jobs, _ = study_jobs()
    for operator in ("local_mlp", "local_attention"):
        cpgs = {j.get("sharing.channels_per_group", "32") for j in jobs
                if j["operator"] == operator and "data.train_subset" not in j}
        assert len(cpgs) >= 4 and {"1", "32"} <= cpgs, (operator, cpgs)
    sizes = defaultdict(set)
    for job in jobs:
        if job.get("sharing.channels_per_group") is None:
            sizes[job["operator"]].add(job.get("data.train_subset", "the study's"))
    # 1000 and the study's 5000 images: a 5x range, the most the two-hour budget holds (sweeps/data_scale
    # draws five sizes)
    scaled = [op for op, s in sizes.items() if len(s) >= 2]
    assert {"dwconv", "locally_connected", "local_attention", "global_attention"} <= set(scaled)
