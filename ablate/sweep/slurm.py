"""SLURM jobs that fit the cluster they meet, and a launch that never waits on a job that cannot run.

`launcher=submitit_slurm` (conf/launcher/submitit_slurm.yaml) runs hydra-submitit-launcher's SLURM
launcher through `SlurmLauncher` below, which adds three things before and after submitit's sbatch:

1. **Resources fitted to the partition.** `gpus_per_node`, `cpus_per_task` and `mem_gb` left null are
   derived from the run and the partition's nodes (`sinfo`): no GPU for a CPU run or a partition
   without GPUs, one per task otherwise; up to 10 CPUs per task and the memory share of those CPUs,
   within the largest node. A value set by hand that no node of the partition has fails at once
   (ConfigError: exit 2), naming the resource, what the nodes have and the override that fixes it.
   An sbatch refusal is bad input too: never resubmitted.
2. **No endless pending.** A job pending for a reason that cannot clear by waiting (PartitionConfig
   and its kind, `NEVER_CLEARS`) is cancelled after `pending_limit_s` with that reason.
3. **One result per job.** Each job's outcome is collected on its own: a job cancelled from outside or
   lost with its node is reported failed (the sweeper relaunches it from its checkpoint) while the
   others of the batch run on to their end, so nothing is launched twice.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

from ablate.errors import ConfigError

__all__ = ["NEVER_CLEARS", "Node", "SlurmConf", "SlurmLauncher", "check_settings", "fit_resources",
           "partition_nodes", "sweep_jobs", "watch_pending"]

log = logging.getLogger("ablate.sweep")

# Pending reasons that waiting does not clear: the request exceeds what the partition allows.
NEVER_CLEARS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints"})
CPUS_PER_TASK = 10  # at most, when fitted: a data loader and the intra-op threads of one run
MEM_GB = 64         # at most, when fitted


@dataclass(frozen=True)
class Node:
    cpus: int
    mem_mb: int
    gpus: int

    def describe(self) -> str:
        return f"{self.cpus} CPUs, {self.mem_mb // 1024} GB, {self.gpus or 'no'} GPU{'s' * (self.gpus != 1)}"


def _gpus(gres: str) -> int:
    """GPUs in an sinfo gres string: "gpu:4", "gpu:a100:4(S:0-1)", "(null)", "gpu:2,shard:8"."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[A-Za-z0-9_.-]+)?:(\d+)", gres))


def partition_nodes(partition: str | None) -> tuple[str, list[Node]] | None:
    """(partition name, its nodes) from `sinfo`; None where there is no sinfo or it does not answer
    (then sbatch itself judges the request)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        if partition is None:  # the default partition is the one sinfo marks with '*'
            names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30,
                                   check=True).stdout.split()
            partition = next((n.rstrip("*") for n in names if n.endswith("*")), None)
            if partition is None:
                return None
        out = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%c|%m|%G"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in out.splitlines():
        cpus, mem, gres = (line.split("|") + ["", "", ""])[:3]
        if cpus.strip().isdigit():
            mem_mb = int(mem) if mem.strip().isdigit() else 0
            nodes.append(Node(int(cpus), mem_mb, _gpus(gres)))
    if not nodes:
        raise ConfigError(f"hydra.launcher.partition={partition}: SLURM has no nodes in that partition "
                          "(`sinfo` lists the partitions); set hydra.launcher.partition= to one of them")
    return partition, nodes


def fit_resources(params: dict[str, Any], device: str, partition: str,
                  nodes: Sequence[Node]) -> dict[str, Any]:
    """`params` with null gpus_per_node / cpus_per_task / mem_gb fitted to the largest node of
    `partition`; ConfigError for a value (set or fitted) that no node has."""
    tasks = max(1, int(params.get("tasks_per_node") or 1))
    most_gpus = max(n.gpus for n in nodes)
    out = dict(params)

    def refuse(key: str, value: Any, have: str, fix: str) -> ConfigError:
        return ConfigError(f"hydra.launcher.{key}={value}: no node of partition {partition} has that "
                           f"({have}). {fix}")

    nodes_have = "its nodes: " + "; ".join(sorted({n.describe() for n in nodes}))
    wants_gpu = device.startswith("cuda")
    if out.get("gpus_per_node") is None:
        out["gpus_per_node"] = 0 if device == "cpu" or most_gpus == 0 else min(tasks, most_gpus)
    if wants_gpu and most_gpus == 0:
        raise ConfigError(f"trainer.device={device}: partition {partition} has no GPUs ({nodes_have}). "
                          "Set trainer.device=cpu, or hydra.launcher.partition= to a partition with GPUs")
    if out["gpus_per_node"] > most_gpus:
        raise refuse("gpus_per_node", out["gpus_per_node"], nodes_have,
                     f"Set hydra.launcher.gpus_per_node={most_gpus} (or null: fitted to the partition), or "
                     "hydra.launcher.partition= to a partition with more GPUs")
    # the largest node with the GPUs asked for (there is one: more GPUs than any node has was refused)
    node = max((n for n in nodes if n.gpus >= out["gpus_per_node"]), key=lambda n: (n.cpus, n.mem_mb))
    if out.get("cpus_per_task") is None:
        out["cpus_per_task"] = max(1, min(CPUS_PER_TASK, node.cpus // tasks))
    if out["cpus_per_task"] * tasks > node.cpus:
        most = max(1, node.cpus // tasks)
        raise refuse("cpus_per_task", out["cpus_per_task"], f"{tasks} task(s) per node; {nodes_have}",
                     f"Set hydra.launcher.cpus_per_task={most} (or null: fitted to the partition)")
    if out.get("mem_gb") is None:
        share = node.mem_mb / 1024 * out["cpus_per_task"] * tasks / max(node.cpus, 1)
        out["mem_gb"] = max(1, min(MEM_GB, int(share)))
    if node.mem_mb and out["mem_gb"] * 1024 > node.mem_mb:
        raise refuse("mem_gb", out["mem_gb"], nodes_have,
                     f"Set hydra.launcher.mem_gb={max(1, node.mem_mb // 1024)} or lower (or null: fitted "
                     "to the partition)")
    return out


def squeue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of the jobs squeue still lists (array tasks as <array>_<task>)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def sweep_jobs(sweep_dir: Path, states: str = "PENDING,RUNNING") -> list[str]:
    """The SLURM jobs of the sweep whose Hydra folder is `sweep_dir` (its submitit folder names
    them) that squeue lists in `states`: for the tests and the fault suite, which signal them."""
    folder = sweep_dir / ".submitit"
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not ids:
        return []
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", states, "-o", "%i", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def watch_pending(jobs: Sequence[Any], limit_s: float, poll_s: float = 5.0) -> dict[str, str]:
    """Wait until every submitit job is done; cancel one pending for a reason in NEVER_CLEARS for
    longer than `limit_s`. Returns {job id: reason} of the jobs it cancelled."""
    first_seen: dict[str, float] = {}
    cancelled: dict[str, str] = {}
    while not all(j.done() for j in jobs):
        states = squeue_states([j.job_id for j in jobs if j.job_id not in cancelled])
        now = time.monotonic()
        for job in jobs:
            state, reason = states.get(job.job_id, ("", ""))
            if job.job_id in cancelled or state != "PENDING" or reason not in NEVER_CLEARS:
                first_seen.pop(job.job_id, None)
                continue
            if now - first_seen.setdefault(job.job_id, now) >= limit_s:
                log.error("job %s pending (%s) for %.0f s: cancelled", job.job_id, reason, limit_s)
                job.cancel(check=False)
                cancelled[job.job_id] = reason
        if len(cancelled) == len(jobs):
            break
        time.sleep(poll_s)
    return cancelled


@dataclass
class SlurmConf(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM settings, launched by `SlurmLauncher`; registered as
    `hydra/launcher: ablate_slurm` (conf/launcher/submitit_slurm.yaml selects it)."""

    _target_: str = "hydra_plugins.ablate_sweeper.SlurmLauncher"
    pending_limit_s: float = 120.0  # a job pending for a reason in NEVER_CLEARS this long is cancelled


class SlurmLauncher(SubmititSlurmLauncher):
    """submitit's SLURM launcher with resources fitted to the partition, no endless pending and one
    result per job (module docstring)."""

    def __init__(self, pending_limit_s: float = 120.0, **params: Any) -> None:
        check_settings({**params, "pending_limit_s": pending_limit_s})
        super().__init__(**params)
        self.pending_limit_s = pending_limit_s

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        from hydra.core.singleton import Singleton

        assert self.config is not None and job_overrides
        submitit = _slurm_tools()
        found = partition_nodes(self.params.get("partition"))
        partition = found[0] if found else self.params.get("partition") or "(the default)"
        params = dict(self.params)  # fitted per launch: null stays null in self.params
        if found is not None:
            device = str(OmegaConf.select(self.config, "trainer.device", default="auto"))
            params = fit_resources(params, device, *found)
        shown = {k: params.get(k) for k in ("partition", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                                            "mem_gb", "timeout_min")}
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # submitit's names without a prefix
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        log.info("SLURM jobs: %s", ", ".join(f"{k}={v}" for k, v in shown.items()))
        args = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        try:
            jobs = executor.map_array(self, *zip(*args))
        except submitit.core.utils.FailedJobError as err:  # how submitit reports sbatch's refusal
            if not isinstance(err.__cause__, subprocess.CalledProcessError):
                raise  # not a refusal (sbatch was killed): the sweeper relaunches the batch
            raise ConfigError(f"sbatch refused the jobs (exit {err.__cause__.returncode}: "
                              f"{str(err).strip() or 'its error is printed above'}). Change the "
                              "hydra.launcher.* setting it names") from None
        cancelled = watch_pending(jobs, self.pending_limit_s)
        if cancelled:
            job_id, reason = next(iter(cancelled.items()))
            raise ConfigError(
                f"SLURM job {job_id} stayed pending ({reason}) for {self.pending_limit_s:.0f} s and was "
                f"cancelled, with {len(cancelled) - 1} other(s) like it: partition {partition} cannot run it "
                f"as asked. `scontrol show partition {partition}` shows its limits; change hydra.launcher.* "
                "(timeout_min, nodes, resources) or hydra.launcher.partition")
        return [_outcome(job) for job in jobs]


# hydra.launcher.* settings and the least each takes (None: not set, fitted or SLURM's default)
_AT_LEAST = {"timeout_min": 1, "tasks_per_node": 1, "nodes": 1, "cpus_per_task": 1, "gpus_per_node": 0,
             "mem_gb": 1, "signal_delay_s": 0, "max_num_timeout": 0, "array_parallelism": 1}


def check_settings(params: dict[str, Any]) -> None:
    """The launcher's numbers, each in its range, before anything is submitted (ConfigError: exit 2).
    sbatch takes `--time=0` and `--time=-5` as no limit at all, and a USR2 due before the job starts
    (signal_delay_s past the limit) arrives as it starts, before submitit handles it, and ends it:
    neither is left to SLURM."""
    for key, low in _AT_LEAST.items():
        value = params.get(key)
        if value is not None and value < low:
            raise ConfigError(f"hydra.launcher.{key}={value} must be a whole number >= {low}")
    if not params.get("pending_limit_s", 1) > 0:
        raise ConfigError(f"hydra.launcher.pending_limit_s={params['pending_limit_s']} must be a number > 0")
    limit_s, delay_s = params.get("timeout_min", 1) * 60, params.get("signal_delay_s", 0)
    if delay_s >= limit_s:
        raise ConfigError(f"hydra.launcher.signal_delay_s={delay_s} is not before the job's time limit "
                          f"(hydra.launcher.timeout_min={params.get('timeout_min')}: {limit_s} s): SLURM "
                          "would signal the job as it starts, which ends it. Set signal_delay_s below "
                          f"{limit_s} (e.g. {limit_s // 3}) or raise timeout_min")


def _slurm_tools() -> Any:
    """submitit, where it and SLURM's commands are here; else a ConfigError naming what is missing.
    Without them every job would fail to submit, be relaunched, and be recorded `failed` (exit 1):
    a run that never started is not a failed one, and no relaunch fixes this machine."""
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(f"launcher=submitit_slurm needs the Python package {err.name or 'submitit'}, "
                          "which is not installed here: `pip install submitit` (hydra-submitit-launcher "
                          "depends on it), or choose launcher=joblib or launcher=basic to run on this "
                          "machine") from None
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"launcher=submitit_slurm submits SLURM jobs, but SLURM's {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not on this machine's PATH: launch the "
                          "sweep from a node of the cluster (its login node), or choose launcher=joblib or "
                          "launcher=submitit_local to run here")
    return submitit


def _outcome(job: Any) -> JobReturn:
    """The job's JobReturn; FAILED with the error where it ended without one (cancelled from outside,
    node lost): the sweeper relaunches it, from its checkpoint, if it left no record."""
    try:
        return job.results()[0]
    except Exception as err:  # noqa: BLE001  submitit's UncompletedJobError and its kind
        failed = JobReturn()
        failed.status, failed._return_value = JobStatus.FAILED, err
        return failed
