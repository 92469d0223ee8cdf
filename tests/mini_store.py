"""A real, small results store for the analysis tests: trained by ablate's own sweep commands.

The analysis must be tested on what the trainer really writes (results.json fields, config.yaml,
checkpoints, skipped cells, Hydra's .hydra/ folder), not on hand-written records that could drift
from it. One epoch on 600 Fashion-MNIST images per run, ~2 s each, ~1 minute in all:

    sweep "mini": local_attention, local_mlp, dwconv, dynamic_dwconv        x seeds 0, 1
                  local_mlp with channels_per_group 1 and 8 (32 is its default: a Figure-2 line)
                  dwconv with dynamic=attention: an invalid cell, recorded as skipped

`data.eval_batch_size=100` (not the default 1024) gives the 500 test images five batches, so the
inference throughput is measured (the trainer times the batches after the first).

Set ABLATE_MINI_STORE=<folder> to reuse a store built before (it is built there if missing).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["REPO", "SWEEP", "COMMANDS", "build_mini_store", "mini_store"]

REPO = Path(__file__).resolve().parent.parent
SWEEP = "mini"
_COMMON = ["data.train_subset=600", "data.val_size=500", "data.test_subset=500", "data.batch_size=64",
           "data.eval_batch_size=100", "schedule.epochs=1", "logger=none", "trainer.quiet=true",
           "trainer.threads=1", f"trainer.sweep={SWEEP}"]
COMMANDS = (
    ["operator=local_attention,local_mlp,dwconv,dynamic_dwconv", "trainer.seed=0,1"],
    ["operator=local_mlp", "sharing.channels_per_group=1,8", "trainer.seed=0,1"],
    ["operator=dwconv", "dynamic=attention"],  # invalid: attention needs spatial: none -> skipped
)
# a sweep of nothing but invalid cells records them as skipped and exits 2, as its single run would
EXIT_CODES = (0, 0, 2)
_DONE = ".mini-store-complete"  # a dot-file: load_runs never looks at it


def build_mini_store(root: Path) -> Path:
    """Train the mini store under `root` (root/mini/<run>/...) and return `root`.

    Idempotent: completed runs are not trained again (the sweep skips them), and a finished store is
    marked, so a second call returns at once.
    """
    root = Path(root)
    if (root / _DONE).exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    for overrides, expected in zip(COMMANDS, EXIT_CODES):
        command = [sys.executable, "-m", "ablate.train", "-m", *overrides, *_COMMON,
                   f"trainer.results_root={root}"]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != expected:
            raise RuntimeError(f"building the mini store failed ({' '.join(command)}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (root / _DONE).write_text("ok\n")
    return root


@pytest.fixture(scope="session")
def mini_store(tmp_path_factory) -> Path:
    """The results folder of the mini store, built once per pytest run.

    The tests that use it are one xdist group, but the store must not rely on that: with pytest 9
    and pytest-xdist 3.8, `--dist loadgroup` does not group (xdist renames `item._nodeid`, which
    pytest 9 no longer reads), and pytest registers one copy of this fixture per module importing
    it. So the store lives in the temp dir that all xdist workers share, behind a file lock: the
    first caller trains it, every other one waits and reuses it (the completion mark).
    """
    reuse = os.environ.get("ABLATE_MINI_STORE")
    if reuse:
        return build_mini_store(Path(reuse))
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>/, above popen-gw0, popen-gw1, ...
    with open(base / "mini_store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build_mini_store(base / "mini_store")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
