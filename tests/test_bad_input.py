"""Bad input, table-driven (the table is ablate.reliability.BAD_INPUTS, shared with `make reliability`):
every row gives its exit code and a message that says what to change, and a finished record beside
it comes through untouched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.reliability import BAD_INPUTS, QUICK, run_bad_input

ROOT = Path(__file__).resolve().parent.parent


def test_the_table_has_at_least_25_distinct_rows():
    assert len(BAD_INPUTS) >= 25
    assert len({row.name for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[row.name for row in BAD_INPUTS])
def test_bad_input_gives_a_clear_error_and_touches_no_result(tmp_path, row):
    outcome = run_bad_input(row, tmp_path)
    assert outcome.code == row.code, outcome.message[-2000:]
    missing = [e for e in row.expect if e.lower() not in outcome.message.lower()]
    assert not missing, f"message lacks {missing}:\n{outcome.message[-2000:]}"
    assert not outcome.touched
    assert outcome.code != 0


@pytest.mark.parametrize("overrides, message", [
    (["operator=dwconvx"], "Could not find 'operator/dwconvx'"),
    (["optim.lr=["], "cannot parse the override 'optim.lr=['"),
    (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    (["schedule.epochs=1.5"], "Set schedule.epochs to a whole number"),  # OmegaConf names only the type
    (["optim.lr=abc"], "Set optim.lr to a number"),
    (["schedule.milestones=5"], "Set schedule.milestones to a list in brackets"),
    (["-m", "data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),  # a sweep: the same code
    (["-m", "schedule.decay=step"], "schedule.decay=step needs schedule.milestones"),  # before any job
    (["-m", "schedule.warmup_epochs=5"], "must be between 0 and schedule.epochs"),
    (["-m", "operator=dwconvx"], "Could not find 'operator/dwconvx'"),
    (["-m", "--cfg=job"], "-m (--multirun) and --cfg cannot be given together"),  # Hydra's ValueError
])
def test_the_real_command_line_exits_2(tmp_path, overrides, message):
    flags = [o for o in overrides if o.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "ablate.train", *flags, *QUICK,
                           f"trainer.results_root={tmp_path}", *(o for o in overrides if o not in flags)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(errors) <= 6, proc.stderr[-2000:]  # a few lines, no trace
    assert not list(tmp_path.rglob("results.json"))


READ_ONLY = Path("/sys/ablate-read-only")  # sysfs refuses new files even to root


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs (a read-only place even for root)")
def test_a_read_only_output_folder_exits_2_naming_it(tmp_path):
    def run(*command):
        return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})

    swept = run("-m", "ablate.train", "-m", *QUICK, f"trainer.results_root={READ_ONLY}")
    assert swept.returncode == 2 and str(READ_ONLY) in swept.stderr, swept.stderr[-2000:]
    assert run("-m", "ablate.train", *QUICK, f"trainer.results_root={tmp_path}").returncode == 0
    report = run("-m", "analysis.report", str(tmp_path), "--out", str(READ_ONLY), "--no-weights")
    assert report.returncode == 2 and str(READ_ONLY) in report.stderr, report.stderr[-2000:]
    assert "Traceback" not in swept.stderr + report.stderr


@pytest.mark.parametrize("out", ["a_file", "a_file/report"])
def test_a_report_folder_where_a_file_is_exits_2_saying_what_to_change(tmp_path, out):
    def run(*command):
        return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})

    (tmp_path / "a_file").write_text("a file where the report folder should be\n")
    assert run("-m", "ablate.train", *QUICK, f"trainer.results_root={tmp_path / 'results'}").returncode == 0
    report = run("-m", "analysis.report", str(tmp_path / "results"), "--out", str(tmp_path / out),
                 "--no-weights")
    assert report.returncode == 2 and str(tmp_path / out) in report.stderr, report.stderr[-2000:]
    assert "give a folder" in report.stderr and "Traceback" not in report.stderr, report.stderr[-2000:]
