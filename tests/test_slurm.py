"""The SLURM path against a real one-node cluster: sweeps, resources, preemption, time limits, a job
cancelled from outside, DDP. tests/slurm/cluster.sh starts the cluster (.ci/run does, as root); where
none runs, these tests skip with that reason.

All of them share one cluster, so they run one after another in one xdist worker (xdist_group), and
every job is found by its own results folder, never by "the running job"."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ablate.sweep.slurm import sweep_jobs as slurm_jobs

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"


def _cluster_up() -> bool:
    try:
        status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, timeout=30)
        return status.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = [
    pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster is running here: as root, `bash "
                       "tests/slurm/cluster.sh start` starts a one-node one (.ci/run does)"),
    pytest.mark.xdist_group("slurm"),
]

# Small runs, one thread each (the same thread count as the reference run: CPU runs bit-for-bit).
QUICK = ["data.train_subset=500", "data.val_size=300", "data.test_subset=500", "data.batch_size=64",
         "logger=none"]
SLURM = ["launcher=submitit_slurm", "hydra.launcher.partition=debug"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def sweep(root: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ablate.train", "-m", *QUICK, *SLURM,
                             f"trainer.results_root={root}", *overrides],
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate()
        pytest.fail(f"the sweep did not end within {timeout} s:\n{out[-3000:]}")
    return out


def runs(root: Path) -> dict[str, dict]:
    """{operator: results.json} of the runs under root/runs."""
    return {json.loads(p.read_text())["operator"]: json.loads(p.read_text())
            for p in (root / "runs").glob("*/results.json")}


def epochs_recorded(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    return [json.loads(line)["epoch"] for line in lines]


def run_folder(root: Path, operator: str) -> Path | None:
    return next((p for p in (root / "runs").glob(f"{operator}-*") if p.is_dir()), None)


def job_log(folder: Path) -> str:
    """The submitit logs (stdout and stderr, every attempt) of the sweep that holds run `folder`."""
    return "".join(p.read_text(errors="replace") for p in folder.parent.glob(".hydra/.submitit/*/*_log.*"))


def sweep_jobs(root: Path, states: str) -> list[str]:
    return slurm_jobs(root / "runs" / ".hydra", states)


def running_job(proc: subprocess.Popen, root: Path, timeout: float = 300) -> str:
    """A running SLURM job of the sweep `proc` under `root` once a run of it has a checkpoint on disk:
    one epoch done, more to go. A sweep that ends first fails the test at once, with what it said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before a job of it ran:\n"
                        f"{proc.stdout.read()[-3000:]}")
        running = sweep_jobs(root, "RUNNING") if any((root / "runs").glob("*/checkpoint.pt")) else []
        if running:
            return running[0]
        time.sleep(1)
    pytest.fail(f"no running job with a checkpoint under {root} within {timeout} s")


def cluster_state() -> tuple[str, str, str]:
    """(partition time limit, node name, node state) of the test partition."""
    part = subprocess.run(["scontrol", "show", "partition", "debug", "-o"], capture_output=True, text=True,
                          timeout=30).stdout
    node, state = (subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"], capture_output=True,
                                  text=True, timeout=30).stdout.split() + ["?", "?"])[:2]
    limit = re.search(r"MaxTime=(\S+)", part)
    return (limit.group(1) if limit else "?"), node, state


def restore_cluster(timeout: float = 60) -> None:
    """Put the cluster back as cluster.sh started it: no time limit, its node in service, and (waited
    for, up to `timeout`) no job left running. Tests that drain the node or lower the limit call this
    when they end, and every test calls it before it starts, so one test's change (a job still ending
    after its sweep returned, a restore that slurmctld did not take) never fails the next."""
    deadline = time.monotonic() + timeout
    while True:
        limit, node, state = cluster_state()
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
        changed = limit != "UNLIMITED" or state.startswith(("drain", "drng", "down"))
        if not changed and (not jobs.split() or time.monotonic() > deadline):
            return  # a job that outlives the wait is another's: tests find their own jobs by folder
        if changed and time.monotonic() > deadline:
            pytest.fail(f"the test cluster stays changed: partition debug MaxTime={limit}, node {node} "
                        f"{state}; `bash tests/slurm/cluster.sh stop` then `start` resets it")
        if limit != "UNLIMITED":
            subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=INFINITE"], timeout=30)
        if state.startswith(("drain", "drng", "down")):
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], timeout=30)
        time.sleep(1)


@pytest.fixture(autouse=True)
def cluster_as_started():
    """One SLURM test at a time, each on the cluster as cluster.sh started it. The xdist group keeps
    these tests in one worker; the lock holds where it does not (pytest 9 with pytest-xdist 3.8 ignored
    the group: two workers drained and limited the one node under each other's jobs)."""
    with open(Path(tempfile.gettempdir()) / "ablate-slurm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        restore_cluster()
        yield


def reference(tmp_path: Path, *overrides: str) -> dict:
    """The same run, uninterrupted, in one local process with the job's thread count."""
    root = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "ablate.train", *QUICK, f"trainer.results_root={root}",
                    "trainer.threads=1", "trainer.quiet=true", *overrides], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)
    return next(json.loads(p.read_text()) for p in root.glob("runs/*/results.json"))


SAME = ("final_test_top1", "final_val_top1", "best_val_top1", "epochs_done")


def readme_cluster_command() -> list[str]:
    """The README's first cluster command (its section "A cluster"), as its words."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("These ran on a real one-node cluster"):]
    start = block.index("    python -m ablate.train -m ")
    lines = []
    for line in block[start:].splitlines():
        lines.append(line.split("#")[0].strip().rstrip("\\"))
        if not line.split("#")[0].rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(lines))


def test_the_readme_sweep_completes_with_resources_fitted_to_the_node(tmp_path):
    words = readme_cluster_command()
    assert words[:4] == ["python", "-m", "ablate.train", "-m"] and "launcher=submitit_slurm" in words
    proc = subprocess.Popen([sys.executable, *words[1:], f"trainer.results_root={tmp_path}"], cwd=ROOT,
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = finish(proc)
    assert proc.returncode == 0 and "2 completed" in out, out[-3000:]
    assert {op: r["status"] for op, r in runs(tmp_path).items()} == {"dwconv": "completed",
                                                                   "local_mlp": "completed"}
    assert "gpus_per_node=0" in out  # a CPU node: no GPU asked for
    assert (tmp_path / "runs" / ".hydra").is_dir() and not (tmp_path / "None").exists()


@pytest.mark.parametrize("override, names", [
    ("hydra.launcher.gpus_per_node=4", "hydra.launcher.gpus_per_node=4"),
    ("hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb=100000"),
    ("hydra.launcher.partition=nope", "hydra.launcher.partition=nope"),
    # refused by sbatch itself (submitit raises its FailedJobError): bad input, not a failed run
    ("hydra.launcher.constraint=nosuchfeature", "sbatch refused the jobs (exit 1: sbatch: error: Batch job "
                                                "submission failed: Invalid feature specification)"),
])
def test_an_impossible_request_fails_at_once_naming_the_resource(tmp_path, override, names):
    proc = sweep(tmp_path, "operator=dwconv", "schedule.epochs=1", override)
    out = finish(proc, timeout=300)  # a guard against hanging, not a speed check (6 s measured here)
    assert proc.returncode == 2 and names in out and "Traceback" not in out, out[-2000:]
    assert "retry" not in out  # never resubmitted


def test_a_job_pending_for_a_reason_that_never_clears_is_cancelled_with_it(tmp_path):
    """A job the partition will never run (here: its time limit above the partition's, set while it
    waited for a drained node) is cancelled after pending_limit_s, and the sweep says why: exit 2."""
    node = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    drain = ["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=ablate-test"]
    subprocess.run(drain, check=True)
    try:
        proc = sweep(tmp_path, "operator=dwconv", "schedule.epochs=1", "hydra.launcher.timeout_min=10",
                     "hydra.launcher.pending_limit_s=5")
        deadline = time.monotonic() + 60
        while not sweep_jobs(tmp_path, "PENDING") and time.monotonic() < deadline:
            time.sleep(1)
        subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=1"], check=True)
        out = finish(proc, timeout=120)
    finally:
        restore_cluster()
    assert proc.returncode == 2 and "PartitionTimeLimit" in out and "cancelled" in out, out[-3000:]
    assert "Traceback" not in out and not sweep_jobs(tmp_path, "PENDING,RUNNING")


def job_tasks(job: str) -> list[int]:
    """The pids of the job's step 0 (submitit's training process and any child of it), on this node."""
    job_id = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True,
                            timeout=30).stdout.strip()  # an array task's own id: listpids knows no 142_0
    out = subprocess.run(["scontrol", "listpids", job_id or job], capture_output=True, text=True,
                         timeout=30).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    return [int(row[0]) for row in rows if len(row) > 2 and row[2] == "0"]


def process_state(pid: int) -> str:
    """The state letter of process `pid` (R, S, T for stopped, ...), "" once it is gone or a zombie."""
    try:
        state = re.search(r"^State:\s*(\S)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except FileNotFoundError:
        return ""
    return "" if state is None or state.group(1) in "ZX" else state.group(1)


def stopped(pid: int) -> bool:
    return process_state(pid) == "T"


def signal_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits, undelivered, for process `pid` (as it does while the process is stopped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)


@contextlib.contextmanager
def held(job: str):
    """Job `job`'s step-0 processes stopped (SIGSTOP) for the block, continued (SIGCONT) after: once a test
    has seen a checkpoint, the job cannot finish its run before the test has signalled it, however fast
    the machine. SLURM continues a stopped task itself at its time limit and at scancel without --signal
    (measured); a signal sent with `scancel --signal` waits, pending, for the block's end."""
    tasks = job_tasks(job)
    assert tasks, f"scontrol listpids {job} names no process of step 0"
    for pid in tasks:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all(stopped(pid) for pid in tasks), 30,  # a stop lands when the process next runs
                 f"job {job}'s processes {tasks} did not stop")
        yield tasks
    finally:
        for pid in tasks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def stopped_until_gone(tasks: list[int]) -> bool:
    """Stop again any of `tasks` that SLURM continued (scancel sends SIGCONT with its SIGTERM, then SIGKILL
    KillWait, 5 s, later): held through that wait, a cancelled job ends with its work left on any machine.
    True once all of them are gone."""
    for pid in tasks:
        if process_state(pid) not in ("", "T"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    return not any(process_state(pid) for pid in tasks)


def wait_for(condition, timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.1)


def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_metrics(tmp_path):
    overrides = ("operator=dwconv", "schedule.epochs=3")
    proc = sweep(tmp_path / "slurm", *overrides, "hydra.launcher.cpus_per_task=1")
    job = running_job(proc, tmp_path / "slurm")
    with held(job) as tasks:  # an epoch done, two left, however fast the machine
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM's preemption sends
        wait_for(lambda: any(signal_pending(pid, signal.SIGUSR2) for pid in tasks), 60,
                 f"scancel's USR2 did not reach job {job}'s processes {tasks}")
    out = finish(proc)
    assert proc.returncode == 0 and "1 completed" in out, out[-3000:]
    folder = run_folder(tmp_path / "slurm", "dwconv")
    assert epochs_recorded(folder) == [0, 1, 2]  # each epoch once: resumed, not restarted
    log = job_log(folder)
    assert "preempted" in log.lower() and f"resuming {folder} at epoch" in log, log[-3000:]
    done, ref = runs(tmp_path / "slurm")["dwconv"], reference(tmp_path, *overrides)
    assert {k: done[k] for k in SAME} == {k: ref[k] for k in SAME}


def test_a_job_at_its_time_limit_is_requeued_until_done(tmp_path):
    # SLURM sends the time-limit USR2 at the first tick of its 30 s scheduler clock at which the job has
    # less than signal_delay_s + 30 s left: with a two-minute limit and signal_delay_s=30, 60-90 s after
    # the start. Whether an attempt still has work left then is the machine's speed (a fast CI machine
    # finished all epochs first). So the first attempt, once it has a checkpoint (well before 60 s), is held
    # still until SLURM signals it: on any machine it runs out of time with work left, and handles the
    # signal as it would have. Later attempts run free.
    proc = sweep(tmp_path, "operator=dwconv", "schedule.epochs=12", "data.train_subset=512",
                 "data.val_size=100", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30",
                 "hydra.launcher.cpus_per_task=1")
    job = running_job(proc, tmp_path)
    with held(job) as tasks:
        wait_for(lambda: not any(stopped(pid) for pid in tasks), 150,
                 f"SLURM sent job {job} no time-limit signal within 150 s of a 2-minute limit")
    out = finish(proc, timeout=900)
    assert "1 completed" in out, out[-3000:]
    folder = run_folder(tmp_path, "dwconv")
    assert epochs_recorded(folder) == list(range(12))  # each epoch once: resumed, not restarted
    log = job_log(folder)
    assert "timed-out" in log.lower() and f"resuming {folder} at epoch" in log, log[-3000:]


def test_a_job_cancelled_from_outside_is_relaunched_and_nothing_is_lost_or_doubled(tmp_path):
    overrides = ("schedule.epochs=3",)
    proc = sweep(tmp_path / "slurm", "operator=dwconv,local_mlp", *overrides,
                 "hydra.launcher.cpus_per_task=1")
    job = running_job(proc, tmp_path / "slurm")
    with held(job) as tasks:
        subprocess.run(["scancel", job], check=True)
        wait_for(lambda: stopped_until_gone(tasks), 60, f"job {job} still runs 60 s after scancel")
    out = finish(proc)
    assert proc.returncode == 0 and "2 completed" in out, out[-3000:]
    assert "launching them again" in out  # the sweeper saw the job end without a record
    done = runs(tmp_path / "slurm")
    for op in ("dwconv", "local_mlp"):  # whichever was cancelled: as if it never was
        assert epochs_recorded(run_folder(tmp_path / "slurm", op)) == list(range(3)), op
        ref = reference(tmp_path / op, f"operator={op}", *overrides)
        assert {k: done[op][k] for k in SAME} == {k: ref[k] for k in SAME}, op


def test_ddp_over_two_slurm_tasks(tmp_path):
    out = finish(sweep(tmp_path, "operator=dwconv", "schedule.epochs=1", "trainer=ddp",
                       "hydra.launcher.tasks_per_node=2"))
    assert "1 completed" in out, out[-3000:]
    result = runs(tmp_path)["dwconv"]
    assert result["status"] == "completed" and result["world_size"] == 2
