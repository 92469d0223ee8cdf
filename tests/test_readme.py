"""The README's preset table states what `ablate.measure` measures today."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR
from ablate.measure import measure
from ablate.space.presets import PAPER, PRESETS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README text from the heading `## <title>` to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in section("The presets").splitlines():
        m = re.match(r"\| `(\w+)`", line)
        if m and m.group(1) in PRESETS:
            rows[m.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def measured(preset: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return measure(compose("measure", overrides=[f"operator={preset}", *overrides]))


def test_every_preset_has_a_row():
    assert set(table_rows()) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_row_numbers_are_measured(preset):
    cells = table_rows()[preset]
    for size, params_cell, gmac_cell in (("tiny", cells[6], cells[7]), ("base", cells[8], cells[9])):
        row = measured(preset, f"model={size}")
        params = float(re.match(r"([\d.]+)M", params_cell).group(1))
        gmac = float(re.match(r"([\d.]+)", gmac_cell).group(1))
        assert params == pytest.approx(row["params_m"], abs=0.006), (preset, size)
        assert gmac == pytest.approx(row["gmac"], abs=0.006), (preset, size)
        if (preset, size) in PAPER:  # the paper's numbers stand in parentheses
            ref_params, ref_gmac, _ = PAPER[(preset, size)]
            assert f"({ref_params:.2f}M)" in params_cell and f"({ref_gmac})" in gmac_cell
    micro = measured(preset, "model=micro", "in_chans=1", "num_classes=10")
    params, gmac = re.match(r"([\d.]+)M / ([\d.]+)", cells[10]).groups()
    assert float(params) == pytest.approx(micro["params_m"], abs=0.006)
    assert float(gmac) == pytest.approx(micro["gmac"], abs=0.00006)


# Cells that a run measures on the machine it runs on: a `make demo` elsewhere rewrites reports/demo/
# with its own speeds (and, on another CPU, float rounding may move an accuracy), so the README can
# only be held to the rest of the table there.
MEASURED = ("train img/s", "inference img/s", "top-1 (%)", "95% CI")


def markdown_table(text: str) -> list[list[str]]:
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for i, row in enumerate(rows) if i != 1]


def assert_shows_report_table(text: str, report_table: Path, measured_headers: tuple[str, ...]) -> None:
    """`text` holds the table `report_table` as written: the same columns and rows, and every cell the
    same except the columns a rerun on another machine measures anew."""
    shown, written = markdown_table(text), markdown_table(report_table.read_text())
    assert shown[0] == written[0], f"the README's table has other columns than {report_table}"
    assert len(shown) == len(written), f"the README's table has other rows than {report_table}"
    measured = [i for i, header in enumerate(written[0]) if header in measured_headers]
    assert len(measured) == len(measured_headers)
    for readme_row, report_row in zip(shown[1:], written[1:]):
        for i, (a, b) in enumerate(zip(readme_row, report_row)):
            assert i in measured or a == b, (written[0][i], a, b)


def assert_images_exist(text: str) -> None:
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).is_file(), image


def test_the_demo_section_shows_the_demo_report_itself():
    """The README's demo figure and table are the files `make demo` wrote, not a copy edited by hand."""
    demo = section("The demo")
    assert_shows_report_table(demo, ROOT / "reports" / "demo" / "comparison.md", MEASURED)
    assert_images_exist(demo)


def test_the_study_section_shows_the_study_report_itself():
    """The README's study claims table and figures are those `make study` wrote (reports/study/);
    a rerun elsewhere may move the numbers and verdicts, not the claims or what they compare."""
    study = section("The study")
    assert_shows_report_table(study, ROOT / "reports" / "study" / "claims.md",
                              ("paired seeds", "Δ (points)", "95% CI", "verdict", "seeds to settle"))
    assert_images_exist(study)
    assert "figure2" in study and "data_scale" in study and "selection" in study


def sweep_rows() -> dict[str, list[str]]:
    rows = {}
    for line in section("Sweeps").splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def test_the_sweeps_table_lists_every_sweep_file_with_its_number_of_runs():
    """Every sweeps/*.yaml has a row whose "jobs" is the number of distinct runs it plans (jobs that
    compose to one run identity, e.g. a preset and the same preset with its default set again, are
    one run folder). A tuned sweep plans its selection runs, the final runs of the other seeds and its
    followers, whichever value is chosen (here: the first)."""
    import yaml

    from ablate.runs import run_identity
    from ablate.sweep import expand_grids
    from ablate.sweep.tuning import TuningPlan, parse_tuning
    from ablate.tracking.identity import experiment_key

    rows = sweep_rows()
    files = sorted(p.stem for p in (CONF_DIR.parent / "sweeps").glob("*.yaml"))
    assert sorted(rows) == files
    for name in files:
        text = (CONF_DIR.parent / "sweeps" / f"{name}.yaml").read_text()
        sweeper = yaml.safe_load(text)["hydra"]["sweeper"]
        jobs = expand_grids([], sweeper.get("params"), sweeper.get("grids"))
        tuning = parse_tuning(sweeper.get("tune"))
        if tuning:
            plan = TuningPlan(tuning, jobs)
            scored = {"status": "completed", tuning.metric: 1.0}
            plan.choose(lambda job, scored=scored: scored)
            followers, _ = plan.follower_jobs(expand_grids([], sweeper.get("params"), tuning.follow_grids))
            jobs = plan.selection_jobs() + plan.final_jobs() + followers
        command = "downstream" if f"ablate.downstream -m sweeps={name}" in text else "train"  # its config
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            runs = {(experiment_key(i := run_identity(compose(command, overrides=[f"sweeps={name}", *job]))),
                     i["seed"]) for job in jobs}
        assert int(rows[name][2]) == len(runs), f"sweeps/{name}.yaml plans {len(runs)} runs"


DETECTION_MEASURED = ("box AP", "box AP 95% CI", "AP50", "AP75", "mask AP", "mask AP 95% CI", "mask AP50",
                      "mask AP75")
SEGMENTATION_MEASURED = ("mIoU", "mIoU 95% CI", "pixel acc.")


def test_the_downstream_section_shows_its_report_and_commands_that_compose():
    """The README's Tables 3 and 4 are those `make downstream` wrote (reports/downstream/), and every
    `python -m ablate.train|downstream` line of the section composes as written, the downstream ones
    with the classification run their backbone starts from (the paper's protocol on COCO and ADE20K:
    an ImageNet run at the paper's recipe)."""
    import shlex

    from ablate.runs import pretraining_config, run_folder

    text = section("The paper's other two tasks")
    measured = {"detection": DETECTION_MEASURED, "segmentation": SEGMENTATION_MEASURED,
                "claims": ("paired seeds", "Δ (points)", "95% CI", "verdict", "seeds to settle")}
    for name, headers in measured.items():
        after = text[text.index(f"reports/downstream/{name}.md"):].splitlines()
        start = next(i for i, line in enumerate(after) if line.startswith("|"))
        end = next((i for i, line in enumerate(after[start:], start) if not line.startswith("|")), len(after))
        assert_shows_report_table("\n".join(after[start:end]), ROOT / "reports" / "downstream" / f"{name}.md",
                                  headers)
    assert_images_exist(text)
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m")]
    commands = [shlex.split(line) for line in lines]
    assert {c[2] for c in commands} == {"ablate.train", "ablate.downstream"} and len(commands) >= 6
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        configs = [(c[2], compose("downstream" if c[2] == "ablate.downstream" else "train", overrides=c[3:]))
                   for c in commands]
        trained = {run_folder(cfg) for module, cfg in configs if module == "ablate.train"}
        for module, cfg in configs:
            if module == "ablate.downstream" and cfg.task.pretrained:
                # the backbone starts from a run a command of the section trains
                assert run_folder(pretraining_config(cfg)) in trained, " ".join(map(str, cfg.data.values()))
    imagenet = [cfg for module, cfg in configs if module == "ablate.train" and cfg.data.name == "imagenet"]
    assert imagenet and all(cfg.schedule.epochs == 300 and cfg.model.size.name == "tiny" for cfg in imagenet)


def test_the_downstream_sizes_are_what_ablate_models_dense_counts():
    """The README's sizes beside the paper's: every row's params from the model itself, and one row's
    GMAC from the command the section names."""
    import os
    import subprocess
    import sys

    from ablate.models.dense import MaskRCNN, UPerNet, head_settings
    from ablate.models.zoo import create

    rows = re.findall(r"\| (\w+) \+ (Mask R-CNN|UPerNet), (\d+) x (\d+) \| ([\d.]+)M \| (\d+) \|",
                      section("The paper's other two tasks"))
    assert len(rows) == 6
    for operator, head, h, w, params, _ in rows:
        net = create(operator, "tiny", num_classes=0, img_size=(int(h), int(w)))
        model = (MaskRCNN(net, 81, **head_settings("mask_rcnn", "tiny", {})) if head == "Mask R-CNN"
                 else UPerNet(net, 150, **head_settings("upernet", "tiny", {})))
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(float(params), abs=0.05)
    operator, _, h, w, _, gmac = next(r for r in rows if r[:2] == ("dwconv", "UPerNet"))
    done = subprocess.run([sys.executable, "-m", "ablate.models.dense", "--task", "segmentation",
                           "--operator", operator], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at {h} x {w}:" in done.stdout
    counted = float(re.search(r"([\d.]+) GMAC", done.stdout).group(1))
    assert counted == pytest.approx(float(gmac), abs=0.6)
