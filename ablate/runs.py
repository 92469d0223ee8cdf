"""Where a run lives and what its record says, for every layer that names, plans or reads runs.

A run is one composed config (ablate/config.py) with one seed. Its identity (every setting that can
change what it computes, ablate/tracking/identity.py) names its folder, so the trainer, the sweep
that plans it and the analysis that reads it cannot disagree; `describe_run` is what its record says
it is, `provenance` which code and machine made it, and `record_unrunnable` how a sweep job that
cannot run is recorded without touching a finished run.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import socket
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ablate.config import CONF_DIR, operator_label, spec_from_cfg, sweep_name
from ablate.space.rules import InvalidOperatorError
from ablate.tracking import RunLocked, RunStore, run_folder_name, safe_name
from ablate.tracking.code import code_identity
from ablate.tracking.identity import NOT_IDENTITY, IdentityConflict, experiment_key, identity_from_config

__all__ = ["run_identity", "run_label", "run_folder", "describe_run", "record_unrunnable", "check_processes",
           "provenance", "pretraining_config", "pretraining_key", "derived_settings", "PACKAGES"]

log = logging.getLogger(__name__)
PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy")


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What defines the run: every setting but where it runs and how it is shown, plus the seed
    (ablate/tracking/identity.py says what is left out and why).

    trainer and logger are dropped before resolving: their values may come from the launcher
    (`${hydra:launcher...}`), which a sweeper planning jobs in its own process does not have.
    """
    experiment = {k: cfg[k] for k in cfg if k not in NOT_IDENTITY}
    resolved = OmegaConf.to_container(OmegaConf.create(experiment, parent=cfg), resolve=True,
                                      enum_to_str=True)
    resolved.update(derived_settings(cfg))
    return identity_from_config(resolved, cfg.trainer.seed, cfg.trainer.precision)


def derived_settings(cfg: DictConfig) -> dict[str, Any]:
    """Settings of a run that follow from its config and define it too, so they are part of its
    identity and of the config.yaml its folder records: for a downstream run, the experiment key of
    the classification run its backbone starts from ("scratch" without one)."""
    return {"pretrained_from": pretraining_key(cfg)} if "task" in cfg else {}


@contextlib.contextmanager
def _hydra():
    """Compose inside a running Hydra app (its config search path), or start one for the call."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


# what makes a backbone: taken from the downstream run as it is, so an axis override carries over
OPERATOR_KEYS = ("preset", "connectivity", "sharing", "dynamic", "block")


def pretraining_config(cfg: DictConfig) -> DictConfig:
    """The classification config of the run a downstream run's backbone starts from: the settings of
    `pretrain.overrides` (results in `pretrain.sweep`) with the downstream run's operator (every axis
    override included), model size and seed. One config, so one run folder: found, never guessed."""
    p = cfg.pretrain
    overrides = [f"operator={cfg.preset}", f"model={cfg.model.size.name}", *p.overrides,
                 f"trainer.seed={cfg.trainer.seed}", f"trainer.results_root={cfg.trainer.results_root}",
                 f"trainer.sweep={p.sweep}"]
    with _hydra():
        pre = compose(config_name="train", overrides=overrides)
    with open_dict(pre):
        for key in OPERATOR_KEYS:  # nodes of the same schema: assigned as they are (copied)
            pre[key] = cfg[key]
    return pre


def pretraining_key(cfg: DictConfig) -> str:
    """The experiment key of a downstream run's pretraining, or "scratch" (task.pretrained=false)."""
    if not cfg.task.pretrained:
        return "scratch"
    return experiment_key(run_identity(pretraining_config(cfg)))


def run_label(cfg: DictConfig) -> str:
    return f"{operator_label(cfg)}-{cfg.model.size.name}-{cfg.data.name}-s{cfg.trainer.seed}"


def run_folder(cfg: DictConfig) -> Path:
    """results_root/<sweep>/<name>: both parts pass safe_name, so no override (a run_name with `..`
    or `/`) can put a run outside the results root; checked here once more.

    The code is not part of a run's identity: a relaunch after a code change finds the runs the old
    code finished and trains nothing again. With `trainer.rerun_other_code=true`, a run whose folder
    holds a record made by other code is trained again by this code, beside it, in
    `<name>@<fingerprint>` (the old run is kept; the analysis keeps the two code versions apart).
    """
    t = cfg.trainer
    name = safe_name(t.run_name) if t.run_name else run_folder_name(run_label(cfg), run_identity(cfg))
    root = Path(t.results_root)
    folder = root / safe_name(sweep_name(t.sweep)) / name
    if not folder.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"the run folder {folder} would lie outside trainer.results_root={root}")
    if OmegaConf.select(cfg, "trainer.rerun_other_code", default=False) and _made_by_other_code(folder):
        folder = folder.with_name(f"{folder.name}@{code_identity()['fingerprint'][:8]}")
    return folder


def _made_by_other_code(folder: Path) -> bool:
    """Whether the folder holds a finished record whose code is not this process's."""
    store = RunStore(folder)
    if not store.finished():
        return False
    code = store.read_results().get("code")
    return not isinstance(code, dict) or code.get("fingerprint") != code_identity()["fingerprint"]


def describe_run(cfg: DictConfig, folder: Path) -> dict[str, Any]:
    """What a record says the run is: its name, sweep, preset, every axis value, model, data, seed,
    and the experiment it belongs to (its key, and the identity that key hashes)."""
    identity = run_identity(cfg)
    return {"run": folder.name, "sweep": sweep_name(cfg.trainer.sweep), "preset": cfg.preset,
            "operator": operator_label(cfg), "block": cfg.block.style.name, **spec_from_cfg(cfg).axes,
            "model": cfg.model.size.name, "data": cfg.data.name, "seed": cfg.trainer.seed,
            "experiment": experiment_key(identity), "identity": identity}


def record_unrunnable(cfg: DictConfig, err: Exception) -> Path:
    """Record a sweep job that cannot run: an invalid cell is `skipped`, other bad input `failed`.

    A finished record (completed, diverged) is never replaced: nothing computed is lost; nor is a
    folder of another experiment written to (the job that maps to it says so).
    """
    store = RunStore(run_folder(cfg))
    try:
        store.check_identity(run_identity(cfg))
    except IdentityConflict as conflict:
        log.warning("not recording %s: %s", err, conflict)
        return store.folder
    if not store.finished():
        store.create()
        try:
            store.lock()
        except RunLocked:  # the job holding the folder records it; this one must not touch it
            log.warning("not recording %s: another job holds %s", err, store.folder)
            return store.folder
        try:
            invalid = isinstance(err, InvalidOperatorError)
            record = {"status": "skipped" if invalid else "failed", **describe_run(cfg, store.folder),
                      "reason" if invalid else "error": str(err)}
            if invalid:
                record["rule"] = err.rule
            if not store.finished():  # re-read under the lock: a job may have just finished it
                store.write_results(record)
        finally:
            store.unlock()
    return store.folder



def check_processes(folder: Path, record: dict[str, Any], world_size: int) -> None:
    """A finished run of another number of processes is another experiment: data.batch_size is per
    process, so its global batch and learning rate differ. The identity cannot say so (a config does
    not know how many processes will run it), so the record, which does, is checked: never reported
    as this run's result (as a checkpoint of another world size is never resumed), by the run and by
    the sweep that plans it (ablate/sweep/plan.py)."""
    theirs = record.get("world_size") or 1
    if theirs != world_size:
        raise IdentityConflict(
            f"the run folder {folder} holds a run trained by {theirs} process"
            f"{'es' if theirs > 1 else ''} (global batch {record.get('global_batch_size')}), this job has "
            f"{world_size}: data.batch_size is per process, so the global batch and the learning rate "
            f"differ. Run it with {theirs} process{'es' if theirs > 1 else ''} to find that record, or give "
            "this run another trainer.run_name (or trainer.sweep).")


def provenance() -> dict[str, Any]:
    """Which code and machine made a run: the code identity (ablate/tracking/code.py: fingerprint of
    the package's sources, git commit, dirty), the host and the versions of what it ran on."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["python"] = platform.python_version()
    code = code_identity()
    return {"code": code, "git_commit": code["commit"], "host": socket.gethostname(), "versions": versions}
