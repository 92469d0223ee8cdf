"""Sweeps end to end, through real Hydra multiruns and real launchers (basic, joblib, submitit_local).

Every sweep here trains real micro models on small subsets of the real Fashion-MNIST in
subprocesses, exactly as `python -m ablate.train -m ...` does for a user.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from ablate.models.backbone import SIZES
from ablate.space.grid import axis_grid
from ablate.space.rules import InvalidOperatorError, validate
from ablate.sweep import expand_grids

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_subset=200", "data.val_size=100", "data.test_subset=200", "data.batch_size=100",
        "schedule.epochs=1", "trainer.quiet=true", "trainer.threads=1", "logger=none",
        "trainer.inference_batches=1"]


def sweep_cli(root: Path, *overrides: str, wandb: str | None = "disabled", env: dict | None = None,
              **kwargs) -> subprocess.Popen:
    """`python -m ablate.train -m ...`; WANDB_MODE=`wandb` (None: unset, the config decides)."""
    environ = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "ablate.train", "-m", f"trainer.results_root={root}", *overrides],
        cwd=ROOT, env=environ | ({"WANDB_MODE": wandb} if wandb else {}) | (env or {}), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def run_sweep(root: Path, *overrides: str, timeout: float = 600, wandb: str | None = "disabled",
              env: dict | None = None) -> tuple[int, str]:
    proc = sweep_cli(root, *overrides, wandb=wandb, env=env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/results.json")}


# -- planning (no training) -----------------------------------------------------------------------
def test_grids_are_a_union_and_the_command_line_wins():
    jobs = expand_grids(["trainer.seed=5"], params={"trainer.seed": "0,1", "model": "micro"},
                        grids=[{"operator": "dwconv,local_mlp"},
                               {"operator": "local_mlp", "sharing.channels_per_group": "1,4"}])
    assert len(jobs) == 4  # 2 presets + 2 channel settings; the seed is pinned by the command line
    assert all("trainer.seed=5" in job and "model=micro" in job for job in jobs)
    assert ["operator=local_mlp", "sharing.channels_per_group=4"] == [
        o for o in jobs[-1] if o.startswith(("operator", "sharing"))]


def test_without_grids_it_is_the_basic_product():
    jobs = expand_grids(["operator=dwconv,local_mlp", "trainer.seed=0,1,2"])
    assert len(jobs) == 6 and len({tuple(j) for j in jobs}) == 6


@pytest.mark.parametrize("settings, message", [
    ({"retries": -1}, "hydra.sweeper.retries=-1 must be an integer >= 0"),
    ({"retries": "abc"}, "hydra.sweeper.retries='abc' must be an integer >= 0"),
    ({"poll_seconds": 0}, "hydra.sweeper.poll_seconds=0 must be a number > 0"),
    ({"max_batch_size": "abc"}, "hydra.sweeper.max_batch_size='abc' must be an integer >= 1 or null"),
    ({"grids": []}, "hydra.sweeper.grids is an empty list"),
    ({"grids": {"operator": "dwconv"}}, "hydra.sweeper.grids must be a list of grids"),
    ({"grids": [5]}, "hydra.sweeper.grids must be a list of grids"),
    ({"params": 5}, "hydra.sweeper.params must be a mapping"),
    ({"parms": {"trainer.seed": "0,1"}}, "Did you mean hydra.sweeper.params?"),
])
def test_a_sweeper_setting_out_of_range_is_named_with_what_to_set(settings, message):
    # a sweep file's own settings are input like any other: a clear ConfigError, never a crash
    # (retries=-1 launched nothing and ended in an UnboundLocalError) or a Python message
    from ablate.errors import ConfigError
    from ablate.sweep.sweeper import GridSweeper

    with pytest.raises(ConfigError) as err:
        GridSweeper(**settings)
    assert message in str(err.value)


def test_a_sweeper_setting_out_of_range_exits_2_without_a_traceback(tmp_path):
    code, out = run_sweep(tmp_path, "hydra.sweeper.retries=-1", "trainer.sweep=bad", *TINY)
    assert code == 2 and "hydra.sweeper.retries=-1 must be an integer >= 0" in out, out[-3000:]
    assert "Traceback" not in out and not records(tmp_path / "bad")


@pytest.mark.parametrize("status, retried", [("failed", True), ("lost", True), ("diverged", False),
                                             ("refused", False), ("locked", False)])
def test_the_summary_offers_a_relaunch_only_for_what_a_relaunch_trains_again(tmp_path, status, retried):
    # a relaunch skips a diverged run (finished, like a completed one): "retry" would promise nothing
    from ablate.sweep.progress import summary_text

    summary = {"sweep": "s", "jobs": 2, "seconds": 3.0, "statuses": {"completed": 1, status: 1},
               "skipped_because": {}, "failures": [{"run": "r", "status": status, "error": "why"}]}
    assert ("launch the same command again" in summary_text(summary, tmp_path)) == retried


def test_a_progress_line_reaches_the_sweep_output_while_a_job_silences_stdout(tmp_path, capsys):
    """The polling thread wrote its line to whatever sys.stdout was at that instant: while a job of a
    basic sweep silenced pycocotools (redirect_stdout while a COCO index is built or evaluated), the
    line went into that buffer and was lost, until the next job ended."""
    import contextlib
    import io
    import threading

    from ablate.sweep.plan import Job
    from ablate.sweep.progress import SweepProgress

    progress = SweepProgress("s", [Job(["operator=dwconv"], tmp_path / "run", "run")])
    silenced = io.StringIO()
    with contextlib.redirect_stdout(silenced):  # the job in the main thread, meanwhile
        poll = threading.Thread(target=progress.report, kwargs={"force": True})
        poll.start()
        poll.join()
    assert "[sweep s]" in capsys.readouterr().out and not silenced.getvalue()

def test_pyproject_lists_every_package_and_the_hydra_plugin():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(where=str(ROOT), include=["ablate*", "analysis*"]))
    found.discard("ablate.sweep.hydra_plugin")  # installed as hydra_plugins.ablate_sweeper
    # conf/ and sweeps/ are installed inside the package (ablate/config.py's CONFIG_ROOT); to setuptools
    # every folder of YAML files is a package, listed or left out of the install
    configs = {"ablate." + d.relative_to(ROOT).as_posix().replace("/", ".")
               for d in [ROOT / "conf", *(ROOT / "conf").rglob("*")] if d.is_dir()}
    assert listed == found | configs | {"hydra_plugins.ablate_sweeper", "ablate.sweeps"}


# -- whole sweeps ---------------------------------------------------------------------------------
def test_the_axes_grid_records_every_invalid_cell_as_skipped_and_trains_every_valid_one(tmp_path):
    code, out = run_sweep(tmp_path, "sweeps=axes", *TINY, timeout=1200)
    assert code == 0, out[-3000:]
    found = records(tmp_path / "axes")
    assert len(found) == 144
    widths, sizes = [32, 64, 128, 256], [(14, 14), (7, 7), (4, 4), (2, 2)]
    # the options of conf/dynamic/ (another test in this process may have registered a user's option)
    shipped = {p.stem for p in (ROOT / "conf" / "dynamic").glob("*.yaml")}
    expected = {}
    window = SIZES["micro"].window  # the sweep's model: every connectivity takes its window
    for spec in (s for s in axis_grid(kernel_size=window) if s.dynamic.kind in shipped):
        try:
            validate(spec, widths, sizes)
            expected[json.dumps(spec.axes, sort_keys=True)] = ("completed", None)
        except InvalidOperatorError as err:
            expected[json.dumps(spec.axes, sort_keys=True)] = ("skipped", err.rule)
    axis_names = list(next(iter(axis_grid())).axes)
    assert len(expected) == 144
    seen = {json.dumps({k: r[k] for k in axis_names}, sort_keys=True): (r["status"], r.get("rule"))
            for r in found.values()}
    assert seen == expected  # the sweep walks exactly the grid, and agrees with `validate` on each cell
    skipped = [r for r in found.values() if r["status"] == "skipped"]
    assert len(skipped) == 75 and all("Nearest valid settings" in r["reason"] for r in skipped)
    assert "69 completed, 75 skipped" in out


def test_a_sweep_killed_midway_completes_only_the_missing_jobs(tmp_path):
    grid = ["operator=dwconv,local_mlp", "trainer.seed=0,1", "trainer.sweep=killed", *TINY,
            "schedule.epochs=3", "data.train_subset=1500"]
    proc = sweep_cli(tmp_path, *grid, start_new_session=True)
    folder, deadline = tmp_path / "killed", time.time() + 600
    # kill once two jobs are finished and the third is part-way (it has a checkpoint, no results)
    while time.time() < deadline:
        done = [p for p in folder.glob("*/results.json")]
        partial = [p for p in folder.glob("*/checkpoint.pt") if not (p.parent / "results.json").exists()]
        if len(done) >= 2 and partial:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in folder.glob("*/results.json")}
    assert 2 <= len(before) < 4, "killed too late to test"

    code, out = run_sweep(tmp_path, *grid)
    assert code == 0, out[-3000:]
    after = records(folder)
    assert len(after) == 4 and all(r["status"] == "completed" for r in after.values())
    for name, (mtime, text) in before.items():  # no finished run trained again
        path = folder / name / "results.json"
        assert (path.stat().st_mtime_ns, path.read_text()) == (mtime, text)
    for name in after:  # none duplicated: every epoch recorded once
        epochs = [json.loads(line)["epoch"] for line in (folder / name / "metrics.jsonl").open()]
        assert epochs == [0, 1, 2]
    assert f"{len(before)} already finished" in out and "resuming" in out


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # a batch larger than the training split: found when the job loads its data, not before
    tiny = [o for o in TINY if not o.startswith("data.batch_size")]
    code, out = run_sweep(tmp_path, "operator=dwconv", "data.batch_size=100,5000", "trainer.sweep=mixed",
                          *tiny)
    found = records(tmp_path / "mixed")
    statuses = sorted(r["status"] for r in found.values())
    assert statuses == ["completed", "failed"], out[-3000:]
    failed = next(r for r in found.values() if r["status"] == "failed")
    assert "larger than the training split" in failed["error"]
    assert code == 1  # the sweep finished all it could, and says some jobs failed
    summary = json.loads((tmp_path / "mixed" / ".hydra" / "summary.json").read_text())
    assert summary["statuses"] == {"completed": 1, "failed": 1}


def test_a_job_whose_run_folder_another_job_holds_is_reported_locked(tmp_path):
    """Not "lost, ended without a record" with the advice to relaunch at once: which job holds the
    folder, and the sweep exits 1 (that job did not run here); the other jobs go on."""
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR
    from ablate.runs import run_folder
    from ablate.tracking import RunStore

    grid = ["trainer.sweep=held", *TINY]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["operator=dwconv", f"trainer.results_root={tmp_path}", *grid])
    holder = RunStore(run_folder(cfg))
    holder.create()
    holder.lock()  # this process plays the other job (a sweep killed with SIGKILL leaves its workers)
    try:
        code, out = run_sweep(tmp_path, "operator=dwconv,local_mlp", *grid)
    finally:
        holder.unlock()
    assert code == 1, out[-3000:]
    assert f"locked: {holder.folder.name}: another job is training the run" in out, out[-3000:]
    assert f"pid {os.getpid()}" in out and "ended without writing a record" not in out
    summary = json.loads((tmp_path / "held" / ".hydra" / "summary.json").read_text())
    assert summary["statuses"] == {"completed": 1, "locked": 1}
    assert not holder.results.exists()  # nothing recorded in the held folder


def test_a_record_of_another_number_of_processes_is_refused_not_counted_finished(tmp_path):
    """data.batch_size is per process: a run recorded by 2 processes is another experiment (twice the
    global batch and learning rate). A single run refuses it (exit 2); the sweep counted it "already
    completed" for jobs of one process, and reported the sweep done."""
    from ablate.tracking import RunStore

    grid = ["operator=dwconv", "trainer.sweep=procs", *TINY]
    code, out = run_sweep(tmp_path, *grid)
    assert code == 0, out[-3000:]
    (folder,) = [p for p in (tmp_path / "procs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    store = RunStore(folder)
    record = store.read_results()
    store.write_results({**record, "world_size": 2, "global_batch_size": 2 * record["global_batch_size"]})
    code, out = run_sweep(tmp_path, *grid)
    assert code == 1, out[-3000:]
    assert f"refused: {folder.name}: the run folder {folder} holds a run trained by 2 processes" in out
    assert store.read_results()["world_size"] == 2  # untouched


def test_launcher_tasks_without_ddp_are_refused_before_any_job(tmp_path):
    """Each of the tasks would train the run alone: one trains, the others are refused its folder."""
    code, out = run_sweep(tmp_path, "launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                          "trainer.sweep=tasks", *TINY)
    assert code == 2, out[-3000:]
    assert "hydra.launcher.tasks_per_node x nodes = 2 starts 2 processes per job" in out, out[-3000:]
    assert "Traceback" not in out and not records(tmp_path / "tasks")


def test_a_value_out_of_range_stops_the_sweep_before_any_job_trains(tmp_path):
    # as in a single run: exit 2, the key named; the valid cell is not trained either
    code, out = run_sweep(tmp_path, "operator=dwconv", "optim.lr=1e-3,-1", "trainer.sweep=bad", *TINY)
    assert code == 2 and "optim.lr=-1.0 must be a finite number > 0" in out, out[-3000:]
    assert "Traceback" not in out and not records(tmp_path / "bad")


@pytest.mark.parametrize("launcher,here", [("basic", True), ("joblib", True), ("submitit_local", True),
                                           ("submitit_slurm", False)])
def test_only_a_cluster_s_jobs_skip_the_device_check_of_the_plan(launcher, here):
    """A sweep checks its jobs' device while planning where they run on this machine (bad-input
    table: `-m trainer.device=cuda:99`, exit 2); a cluster's jobs meet their nodes' GPUs, which a
    login node without one cannot check."""
    import hydra_plugins.ablate_sweeper  # noqa: F401  registers hydra/launcher: ablate_slurm, as the app does
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR
    from ablate.sweep.plan import runs_here

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("train", overrides=[f"launcher={launcher}"], return_hydra_config=True)
    assert runs_here(master) is here


def test_a_joblib_sweep_runs_four_jobs_on_two_workers(tmp_path):
    # W&B offline: each job of a reused worker process must get a W&B run of its own
    code, out = run_sweep(tmp_path, "operator=dwconv,local_mlp", "trainer.seed=0,1", "launcher=joblib",
                          "hydra.launcher.n_jobs=2", "trainer.sweep=joblib", "logger=wandb",
                          *[o for o in TINY if not o.startswith(("trainer.threads", "logger"))],
                          wandb="offline")
    assert code == 0, out[-3000:]
    assert "JoblibLauncher" in out and "4/4 jobs done" in out
    found = records(tmp_path / "joblib")
    assert len(found) == 4 and {r["status"] for r in found.values()} == {"completed"}
    assert {r["seed"] for r in found.values()} == {0, 1}
    threads = {(tmp_path / "joblib" / n / "config.yaml").read_text().split("threads: ")[1].split()[0]
               for n in found}
    assert threads == {str(max(1, (os.cpu_count() or 1) // 2))}  # the cores shared out
    wandb_runs = [list((tmp_path / "joblib" / n / "wandb").glob("offline-run-*")) for n in found]
    assert all(len(runs) == 1 for runs in wandb_runs)
    assert len({runs[0].name.rsplit("-", 1)[1] for runs in wandb_runs}) == 4  # four distinct run ids


def test_an_unreachable_wandb_server_is_found_once_and_every_run_is_logged_offline(tmp_path):
    # an API key, so the runs would be online, and a server that refuses connections (port 1 of this
    # machine: nothing listens there). The sweep decides once; both runs are complete offline runs.
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:1", "HOME": str(tmp_path)}
    code, out = run_sweep(tmp_path, "operator=dwconv,local_mlp", "trainer.sweep=unreachable", "logger=wandb",
                          *[o for o in TINY if not o.startswith("logger")], wandb=None, env=env)
    assert code == 0, out[-3000:]
    assert out.count("cannot be reached") == 1, out[-3000:]  # decided once, by the sweep, for every job
    found = records(tmp_path / "unreachable")
    assert len(found) == 2 and {r["status"] for r in found.values()} == {"completed"}
    for name in found:
        runs = list((tmp_path / "unreachable" / name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, name
        history = next(runs[0].glob("*.wandb")).read_bytes()
        # complete: the run's config, its epoch's metrics and the summary written just before finish
        assert b"axes/dynamic" in history and b"val_top1" in history and b"final_test_top1" in history


@pytest.mark.parametrize("status, mode", [(200, "online"), (404, "offline")])
def test_only_a_healthy_answer_counts_as_a_reachable_wandb_server(monkeypatch, status, mode):
    # some networks answer every request (404 from a gateway): that is no W&B server
    import http.server
    import threading

    from ablate.tracking import wandb_logger

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(status if self.path == "/healthz" else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv(wandb_logger.OFFLINE_ENV, raising=False)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(wandb_logger, "_probed", set())
        assert wandb_logger.resolve_mode(None) == mode
    finally:
        server.shutdown()


def test_a_sweep_keeps_a_key_given_on_its_command_line_out_of_the_results_folder(tmp_path):
    """The sweep's copy of its config (`<sweep>/.hydra/multirun.yaml`) held `+logger.api_key=...` as
    typed, three times (the config, Hydra's overrides and their joined name), though every run's
    config.yaml redacted it: it is saved scrubbed, as the runs' configs are."""
    code, out = run_sweep(tmp_path, "+logger.api_key=hunter2hunter2", "+trainer.hf_token=abc123abc123",
                          "trainer.sweep=keys", *TINY)
    assert code == 0, out[-3000:]
    saved = (tmp_path / "keys" / ".hydra" / "multirun.yaml").read_text()
    assert "<redacted>" in saved and "trainer.sweep=keys" in saved
    for path in [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".pt", ".pkl")]:
        text = path.read_bytes()
        assert b"hunter2hunter2" not in text and b"abc123abc123" not in text, path


def test_a_submitit_local_sweep_runs_two_jobs(tmp_path):
    code, out = run_sweep(tmp_path, "operator=dwconv,local_mlp", "launcher=submitit_local",
                          "trainer.sweep=submitit", *TINY)
    assert code == 0, out[-3000:]
    found = records(tmp_path / "submitit")
    assert len(found) == 2 and {r["status"] for r in found.values()} == {"completed"}
    assert list((tmp_path / "submitit" / ".hydra" / ".submitit").glob("*/*_result.pkl"))


def test_submitit_local_tasks_of_a_ddp_job_train_one_run_together(tmp_path):
    """`hydra.launcher.tasks_per_node=2 trainer=ddp` on submitit_local (the SLURM code path, runnable
    here): the two tasks form one process group, as SLURM's do. They each trained the run alone in one
    process, one of them refused its folder, and the sweep reported a 1-process run completed."""
    code, out = run_sweep(tmp_path, "trainer=ddp", "trainer.device=cpu", "launcher=submitit_local",
                          "hydra.launcher.tasks_per_node=2", "trainer.sweep=tasks", *TINY)
    assert code == 0, out[-3000:]
    (record,) = records(tmp_path / "tasks").values()
    assert record["status"] == "completed" and record["world_size"] == 2, record
    assert record["global_batch_size"] == 2 * record["batch_size"]
    logs = "".join(p.read_text() for p in (tmp_path / "tasks").rglob("*_log.err"))
    assert logs and "another job is training" not in logs, logs[-3000:]
    assert "training in one process" not in logs, logs[-3000:]
    assert "Grad strides do not match" not in logs, logs[-3000:]  # (1x1 convolutions' size-1 strides)


def _kill_processes_running(marker: str) -> int:
    """SIGKILL the submitit job processes (not the sweep) whose command line mentions `marker`."""
    killed = 0
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if marker in cmdline and "submitit.core._submit" in cmdline and proc_dir.name.isdigit():
            os.kill(int(proc_dir.name), signal.SIGKILL)
            killed += 1
    return killed


def test_a_killed_submitit_job_is_launched_again_and_resumes(tmp_path):
    grid = ["operator=dwconv", "launcher=submitit_local", "trainer.sweep=requeue", *TINY,
            "schedule.epochs=3", "data.train_subset=1500"]
    proc = sweep_cli(tmp_path, *grid, start_new_session=True)
    folder, deadline = tmp_path / "requeue", time.time() + 600
    while not list(folder.glob("*/checkpoint.pt")):  # the job is part-way: kill its process
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    assert _kill_processes_running(str(tmp_path)) >= 1
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "launching them again" in out
    (record,) = records(folder).values()
    assert record["status"] == "completed"
    (run,) = [p.parent for p in folder.glob("*/results.json")]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [0, 1, 2]


@pytest.mark.parametrize("settings, message", [
    (["hydra.launcher.timeout_min=0"], "hydra.launcher.timeout_min=0 must be a whole number >= 1"),
    (["hydra.launcher.timeout_min=-5"], "hydra.launcher.timeout_min=-5 must be a whole number >= 1"),
    (["hydra.launcher.tasks_per_node=0"], "hydra.launcher.tasks_per_node=0 must be a whole number >= 1"),
    (["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=90"],
     "signal_delay_s=90 is not before the job's time limit (hydra.launcher.timeout_min=1: 60 s)"),
])
def test_slurm_settings_out_of_range_exit_2_before_anything_is_submitted(tmp_path, settings, message):
    """sbatch runs --time=0 or -5 without a limit; a USR2 due before the start ends the job as it
    starts (measured on tests/slurm/cluster.sh); --ntasks-per-node=0 was refused by sbatch, recorded
    as a failed run and relaunched. Each is named by its key instead, with nothing submitted."""
    code, out = run_sweep(tmp_path, "launcher=submitit_slurm", *settings, *TINY,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert code == 2 and message in out, out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "sweep" / ".submitit").exists()
    assert not list(tmp_path.glob("*/*/results.json"))


@pytest.mark.parametrize("missing, message", [
    ("submitit", "needs the Python package submitit, which is not installed here: `pip install submitit`"),
    ("slurm", "SLURM's sbatch, srun are not on this machine's PATH: launch the sweep from a node of the"),
])
def test_submitit_slurm_without_submitit_or_slurm_exits_2_and_records_nothing(tmp_path, missing, message):
    """Every job would fail to submit, be relaunched and be recorded `failed` (exit 1): a run that
    never started is not a failed one, and no relaunch installs what this machine lacks."""
    bin_dir, shadow = tmp_path / "bin", tmp_path / "shadow"
    bin_dir.mkdir()
    shadow.mkdir()
    for tool in ("sbatch", "srun", "sinfo"):  # a machine with SLURM's commands (they never run here)
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    if missing == "submitit":  # an environment without the package: importing it fails as it would
        (shadow / "submitit.py").write_text("raise ModuleNotFoundError(\"No module named 'submitit'\", "
                                            "name='submitit')\n")
    env = {"PATH": str(bin_dir) if missing == "submitit" else str(tmp_path / "nothing"),
           "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    code, out = run_sweep(tmp_path / "results", "launcher=submitit_slurm", *TINY,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env, timeout=300)
    assert code == 2, out[-3000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out and not list((tmp_path / "results").glob("*/*/results.json"))


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
@pytest.mark.parametrize("sweep, folder", [(None, "runs"), ("demo", "demo")])
def test_the_sweep_folder_is_named_on_every_launcher(launcher, sweep, folder):
    """An ad-hoc sweep (trainer.sweep null) keeps Hydra's files in <results>/runs/.hydra: oc.select
    fell back only for a missing key, so a null one wrote <results>/None/.hydra."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import ablate.train  # noqa: F401  registers ablate's launcher and sweeper with Hydra
    from ablate.config import CONF_DIR

    overrides = [f"launcher={launcher}", "trainer.results_root=/r"]
    overrides += [f"trainer.sweep={sweep}"] if sweep else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == f"/r/{folder}/.hydra"
