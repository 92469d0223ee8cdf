"""Ctrl-C and SIGTERM: one line, exit 130 / 143 after the last checkpoint, no worker left behind, and
the same command resumes (real `python -m ablate.train` processes; ablate/errors.py)."""
from __future__ import annotations

import signal
import time

import pytest

from ablate.reliability import _after_first_epoch, _finish, _record, _session_processes, _start
from ablate.tracking import RunStore


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_run_with_one_line_and_the_same_command_resumes(tmp_path, sig, code):
    proc = _start(tmp_path)
    assert _after_first_epoch(tmp_path, proc), "the run ended before its first epoch"
    proc.send_signal(sig)
    got, out = _finish(proc, timeout=300)
    last = out.strip().splitlines()[-1]
    assert got == code and "Traceback" not in out, out[-3000:]
    assert f"by {sig.name}" in last and "the same command resumes" in last and "checkpointed in" in last
    folder = next((tmp_path / "runs").iterdir())
    done = len(RunStore(folder).read_metrics())
    assert RunStore(folder).read_results() is None  # nothing recorded as failed: it resumes

    got, out = _finish(_start(tmp_path), timeout=300)
    record = _record(tmp_path)
    assert got == 0 and record["status"] == "completed", out[-3000:]
    assert f"resuming {folder} at epoch {done + 1}" in out
    assert record["epochs_done"] == record["epochs"]


def test_sigterm_to_a_joblib_sweep_stops_its_workers(tmp_path):
    sweep = ["-m", "operator=dwconv,local_mlp", "launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = _start(tmp_path, *sweep)
    assert _after_first_epoch(tmp_path, proc), "the sweep ended before a job finished an epoch"
    proc.send_signal(signal.SIGTERM)
    got, out = _finish(proc, timeout=300)
    time.sleep(0.5)
    left = _session_processes(proc.pid)  # the sweep's session: its workers and theirs
    assert got == 143 and not left, (left, out[-3000:])
    assert "Traceback" not in out and "worker processes stopped" in out.strip().splitlines()[-1]

    got, out = _finish(_start(tmp_path, *sweep), timeout=600)
    records = [RunStore(p).read_results() for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert got == 0 and sorted(r["status"] for r in records if r) == ["completed", "completed"], out[-3000:]
