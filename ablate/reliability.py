"""`python -m ablate.reliability`: the fault-injection suite (`make reliability`).

It does to real training what a cluster and its users do, and checks that nothing is lost:

- kills: real `python -m ablate.train` runs are SIGKILLed at random instants (seeded), then started
  again; each must resume and end with exactly the metrics of an uninterrupted reference run;
- damage: a truncated and a bit-flipped checkpoint (the previous good one must be used, and the
  run must still match the reference), an edited results.json (detected, recorded again), both
  checkpoints damaged (a clear error, nothing touched), a run folder locked by another job, a disk
  that fills during training (a `failed` record saying so, no half-written file, then a resume);
- signals: SIGINT and SIGTERM to a run after its first epoch (one line, exit 130 / 143, then the same
  command resumes it to the reference's metrics) and SIGTERM / SIGKILL to a joblib sweep (no worker
  left behind);
- W&B unreachable: an API key and a server that refuses connections (one decision, a complete offline
  run, the reference's metrics);
- SLURM, where a cluster answers: a job preempted (USR2) and one cancelled from outside end with the
  reference's metrics; an impossible request exits 2 at once naming the resource;
- bad input: every row of BAD_INPUTS (shared with tests/test_bad_input.py) must end with its exit
  code and a message that says what to change, and leave a finished record beside it untouched.

It prints: faults injected, faults survived, bad inputs tried, clear errors given, results lost.
Exit status 0 only when every fault was survived, every error was clear and no result was lost.

    python -m ablate.reliability                  # 6 kills, the whole table (a few minutes)
    python -m ablate.reliability --kills 2 --no-table
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from ablate.cli import run_cli

__all__ = ["BAD_INPUTS", "BadInput", "Figures", "run_bad_input", "run_table", "main"]

REPO = Path(__file__).resolve().parent.parent
# Small and single-threaded: a resumed CPU run then repeats the uninterrupted one bit for bit.
TRAIN = ["data.train_subset=1000", "data.val_size=500", "data.test_subset=1000", "data.batch_size=64",
         "schedule.epochs=3", "logger=none", "trainer.quiet=true", "trainer.threads=1",
         "trainer.inference_batches=1"]
# What a resumed run must reproduce exactly.
COMPARED = ("final_test_top1", "final_test_top5", "final_val_top1", "final_val_top5", "best_val_top1",
            "best_epoch", "epochs_done")
# The bad-input rows train at most a few steps of this.
QUICK = ["data.train_subset=200", "data.val_size=100", "data.test_subset=100", "data.batch_size=64",
         "schedule.epochs=1", "logger=none", "trainer.quiet=true", "trainer.threads=1",
         "trainer.inference_batches=0"]


# -- the bad-input table ------------------------------------------------------------------------
@dataclass(frozen=True)
class BadInput:
    """One bad input: overrides ({tmp} is a scratch folder), the exit code it must give, and text
    its message must contain (case-insensitive) - the message says what to change. `setup` names a
    fixture in SETUPS (a damaged data folder, a corrupt checkpoint, a held lock, a full disk)."""

    name: str
    overrides: tuple[str, ...]
    expect: tuple[str, ...]
    code: int = 2
    setup: str | None = None


def _row(name, overrides, *expect, code=2, setup=None) -> BadInput:
    return BadInput(name, tuple(overrides.split()) if isinstance(overrides, str) else tuple(overrides),
                    tuple(expect), code, setup)


BAD_INPUTS: list[BadInput] = [
    # invalid axis combinations (one place for the rules: ablate.space.rules)
    _row("attention with offset sharing", "dynamic=attention", "attention needs spatial: none",
         "sharing.spatial=none"),
    _row("inhomogeneous with offset sharing", "dynamic=inhomogeneous", "inhomogeneous needs spatial: none"),
    _row("homogeneous without offset sharing", "dynamic=homogeneous sharing=none",
         "homogeneous needs spatial: offset"),
    _row("channels_per_group not dividing a width", "sharing.channels_per_group=5",
         "must divide every stage width", "sharing.channels_per_group=4"),
    _row("channels_per_group list of wrong length", "sharing.channels_per_group=[1,2]",
         "one number or one per stage"),
    _row("image size not a multiple of the patch", "data.img_size=27", "multiple of patch_size",
         "img_size=28"),
    # unknown names: Hydra lists the options
    _row("unknown preset", "operator=dwconvx", "Could not find 'operator/dwconvx'", "dwconv"),
    _row("unknown size", "model=huge", "Could not find 'model/huge'", "tiny"),
    _row("unknown data set option", "data=mnist", "Could not find 'data/mnist'", "fashion_mnist"),
    _row("unknown data set name", "data.name=mnist", "unknown data set data.name='mnist'", "fashion_mnist"),
    _row("unknown launcher", "launcher=slurmx", "Could not find 'launcher/slurmx'", "submitit_slurm"),
    _row("misspelt key", "optim.lrr=0.1", "Key 'lrr' not in 'OptimConf'", "Did you mean optim.lr"),
    _row("key under another group", "trainer.epochs=2", "Key 'epochs' not in 'TrainerConf'",
         "Did you mean schedule.epochs"),
    _row("override with bad syntax", "optim.lr=[", "cannot parse the override 'optim.lr=['", "key=value"),
    _row("value of the wrong type", "data.batch_size=many", "data.batch_size", "many"),
    # numbers that cannot work
    _row("zero learning rate", "optim.lr=0", "optim.lr=0.0 must be a finite number > 0"),
    _row("negative learning rate", "optim.lr=-0.001", "optim.lr=-0.001 must be"),
    _row("NaN learning rate", "optim.lr=nan", "optim.lr=nan must be a finite number"),
    _row("zero batch size", "data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    _row("negative batch size", "data.batch_size=-8", "data.batch_size=-8 must be an integer >= 1"),
    _row("batch larger than the data", "data.batch_size=100000", "larger than the training split",
         "lower data.batch_size"),
    _row("zero epochs", "schedule.epochs=0", "schedule.epochs=0 must be an integer >= 1"),
    _row("warmup longer than training", "schedule.warmup_epochs=5",
         "schedule.warmup_epochs=5.0 must be between 0 and schedule.epochs"),
    _row("a kernel size for global connectivity", "operator=global_attention connectivity.kernel_size=5",
         "global connectivity has no kernel size", "connectivity.kernel_size=3"),
    _row("a step decay without milestones", "schedule.decay=step",
         "schedule.decay=step needs schedule.milestones"),
    _row("a decay's setting under another decay", "schedule.power=2",
         "schedule.power=2.0 is read by schedule.decay=poly only"),
    _row("a milestone past the training", "schedule.decay=step schedule.milestones=[1,9]",
         "must rise, each below schedule.epochs"),
    _row("wrong number of classes", "data.num_classes=5", "set data.num_classes=10"),
    _row("wrong number of channels", "data.in_chans=3 data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5]",
         "set data.in_chans=1"),
    _row("one BatchNorm sample per step", "operator=dynamic_dwconv data.batch_size=1",
         "BatchNorm a single sample", "raise data.batch_size"),
    _row("unknown resume mode", "trainer.resume=sometimes",
         "trainer.resume='sometimes' must be one of auto, never"),
    _row("zero CPU threads", "trainer.threads=0", "trainer.threads=0 must be an integer >= 1"),
    _row("unknown precision", "trainer.precision=fp8",
         "trainer.precision='fp8' must be one of auto, bf16, fp32"),
    _row("unknown W&B mode", "logger=wandb logger.mode=sometimes",
         "logger.mode='sometimes' must be one of auto, online, offline, disabled"),
    # the data on disk
    _row("missing data set folder", "data.root={tmp}/nowhere data.download=false", "Fashion-MNIST not found"),
    _row("empty data set folder", "data=imagenet data.root={tmp}/empty model=micro data.img_size=28",
         "image folder data set not found", "data.root=", setup="empty_folder"),
    _row("unreadable image", "data=imagenet data.root={tmp}/images model=micro data.img_size=28 "
         "data.in_memory=true data.num_classes=2 data.val_size=0 data.batch_size=2 data.num_workers=0",
         "cannot be read", "bad.png", "Replace or delete the damaged file", setup="bad_image"),
    # the results store
    _row("results folder is a file", "trainer.results_root={tmp}/a_file/results", "is a file, not a folder",
         "trainer.results_root", setup="file_as_root"),
    _row("full disk", "", "not enough free disk space", "MiB free", setup="full_disk"),
    _row("corrupt checkpoint", "", "no usable checkpoint", "checkpoint.pt fails its checksum",
         "trainer.resume=never", setup="corrupt_checkpoint"),
    _row("run folder held by another job", "", "another job is training the run", code=4, setup="locked"),
    # the same input in a sweep gives the same exit code as in a single run (ablate/errors.py)
    _row("unknown sweep", "-m sweeps=nope", "Could not find 'sweeps/nope'", "The options of sweeps"),
    _row("unknown preset in a sweep", "-m operator=dwconvx", "Could not find 'operator/dwconvx'",
         "operator=dwconv"),
    _row("misspelt key in a sweep", "-m optim.lrr=0.1", "Key 'lrr' not in 'OptimConf'",
         "Did you mean optim.lr"),
    _row("value out of range in a sweep", "-m optim.lr=0", "optim.lr=0.0 must be a finite number > 0"),
    _row("sweep file with a misspelt key", "-m sweeps=misspelt hydra.searchpath=[file://{tmp}/conf]",
         "In 'sweeps/misspelt'", "Key 'epoch' not in 'ScheduleConf'", "schedule.epochs", setup="sweep_files"),
    _row("sweep file that is not YAML", "-m sweeps=broken hydra.searchpath=[file://{tmp}/conf]",
         "broken.yaml, line", "is not valid YAML", setup="sweep_files"),
    _row("a sweeper setting of the wrong kind", "-m hydra.sweeper.tune=5",
         "hydra.sweeper.tune must be a mapping"),
    _row("defaults tree of an unknown preset", "--info defaults-tree operator=nope",
         "Could not find 'operator/nope'"),
    # values of the schema (ablate/schema.py): named with what they must be, before anything is built
    _row("unknown device", "trainer.device=tpu9", "trainer.device='tpu9' must be auto, cpu, cuda"),
    # a GPU this machine lacks (no GPU here, or not 99 of them): refused before anything is written, in
    # a sweep too, whose jobs would run here (a cluster's jobs meet their nodes' GPUs instead)
    _row("a GPU the machine lacks", "trainer.device=cuda:99", "trainer.device=cuda:99, but"),
    _row("a GPU the machine lacks, in a sweep", "-m trainer.device=cuda:99", "trainer.device=cuda:99, but"),
    _row("beta out of range", "optim.betas=[2,0.999]", "optim.betas=[2.0, 0.999] must be a list of 2 values"),
    _row("window larger than every map", "connectivity.kernel_size=29", "spans every map",
         "connectivity.kernel_size="),
    # damaged data: named, with the fix (the published checksums, ablate/data/fashion_mnist.sha256)
    _row("Fashion-MNIST labels of random bytes", "data.root={tmp}/fmnist",
         "train-labels-idx1-ubyte is damaged", "make data", setup="random_labels"),
    _row("truncated Fashion-MNIST images", "data.root={tmp}/fmnist", "train-images-idx3-ubyte is damaged",
         "make data", setup="truncated_images"),
    # a NaN loss: the run ends, recorded as diverged, with what to change
    _row("NaN loss", "optim.lr=1e12 schedule.warmup_epochs=0 optim.clip_grad=null schedule.epochs=2",
         "diverged", "Lower optim.lr", code=3),
]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _run_folder(overrides: list[str]) -> Path:
    from ablate.runs import run_folder

    return run_folder(_compose(overrides))


@contextlib.contextmanager
def _empty_folder(tmp: Path, overrides: list[str]) -> Iterator[None]:
    (tmp / "empty").mkdir()
    yield


@contextlib.contextmanager
def _bad_image(tmp: Path, overrides: list[str]) -> Iterator[None]:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp / "images" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp / "images" / split / cls / f"{i}.png")
    (tmp / "images" / "train" / "a" / "bad.png").write_bytes(b"not an image: a download cut short")
    yield


@contextlib.contextmanager
def _file_as_root(tmp: Path, overrides: list[str]) -> Iterator[None]:
    (tmp / "a_file").write_text("a file where a folder should be\n")
    yield


@contextlib.contextmanager
def _full_disk(tmp: Path, overrides: list[str]) -> Iterator[None]:
    real = shutil.disk_usage

    def nearly_full(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, 64 * 1024)  # 64 KiB left

    with mock.patch("ablate.tracking.store.shutil.disk_usage", nearly_full):
        yield


@contextlib.contextmanager
def _corrupt_checkpoint(tmp: Path, overrides: list[str]) -> Iterator[None]:
    from ablate.tracking import RunStore

    store = RunStore(_run_folder(overrides))
    store.create()
    store.checkpoint.write_bytes(b"PK\x03\x04" + os.urandom(4096))  # a zip header, then garbage
    store.checksums.write_text(json.dumps({"sha256": ["0" * 64]}))
    yield


@contextlib.contextmanager
def _locked(tmp: Path, overrides: list[str]) -> Iterator[None]:
    from ablate.tracking import RunStore

    store = RunStore(_run_folder(overrides))
    store.create()
    store.lock()  # this process plays the other job: a separate open file, so flock conflicts
    try:
        yield
    finally:
        store.unlock()


@contextlib.contextmanager
def _sweep_files(tmp: Path, overrides: list[str]) -> Iterator[None]:
    """A user's sweep folder beside the project's: one file with a misspelt key, one not YAML."""
    sweeps = tmp / "conf" / "sweeps"
    sweeps.mkdir(parents=True)
    (sweeps / "misspelt.yaml").write_text("# @package _global_\nschedule:\n  epoch: 2\n")
    (sweeps / "broken.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    grids: [\n")
    yield


def _damaged_fashion_mnist(damage: Callable[[Path], None]):
    @contextlib.contextmanager
    def setup(tmp: Path, overrides: list[str]) -> Iterator[None]:
        from ablate.data.sources import FMNIST_SHA256

        raw = tmp / "fmnist" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        source = REPO / "data" / "FashionMNIST" / "raw"
        for line in FMNIST_SHA256.read_text().split("\n"):
            if line.strip():
                name = line.split()[1]
                (raw / name).write_bytes((source / name).read_bytes())
        damage(raw)
        yield

    return setup


SETUPS: dict[str, Callable[[Path, list[str]], contextlib.AbstractContextManager]] = {
    "empty_folder": _empty_folder, "bad_image": _bad_image, "file_as_root": _file_as_root,
    "full_disk": _full_disk, "corrupt_checkpoint": _corrupt_checkpoint, "locked": _locked,
    "sweep_files": _sweep_files,
    "random_labels": _damaged_fashion_mnist(
        lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(random.Random(0).randbytes(60008))),
    "truncated_images": _damaged_fashion_mnist(
        lambda raw: os.truncate(raw / "train-images-idx3-ubyte", 1_000_000)),
}


@dataclass
class Outcome:
    row: BadInput
    code: int | None
    message: str
    clear: bool
    touched: list[str] = field(default_factory=list)


def _sentinel(root: Path) -> tuple[Path, bytes]:
    """A finished record beside every bad input: it must come through byte for byte."""
    from ablate.tracking import RunStore

    store = RunStore(root / "runs" / "sentinel-finished-run")
    store.create()
    store.write_results({"status": "completed", "final_test_top1": 91.25, "note": "must not change"})
    return store.results, store.results.read_bytes()


def _finished_records(root: Path) -> list[Path]:
    from ablate.tracking import RunStore

    return [p for p in root.rglob("results.json") if RunStore(p.parent).finished()]


def run_bad_input(row: BadInput, tmp: Path) -> Outcome:
    """Run one row through the real command line (in this process: `ablate.train.cli`)."""
    from ablate.train import cli

    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "results"
    sentinel, before = _sentinel(root)
    given = [o.format(tmp=tmp) for o in row.overrides]
    flags = [o for o in given if o.startswith("-") or o == "defaults-tree"]  # Hydra's flags come first
    overrides = [*flags, *QUICK, f"trainer.results_root={root}", *(o for o in given if o not in flags)]
    setup = SETUPS[row.setup](tmp, overrides) if row.setup else contextlib.nullcontext()
    err = io.StringIO()
    with setup, contextlib.redirect_stderr(err), contextlib.redirect_stdout(err), \
            mock.patch.dict(os.environ, {"WANDB_MODE": "disabled"}):
        try:
            cli(overrides)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    message = err.getvalue()
    touched = []
    if sentinel.read_bytes() != before:
        touched.append(str(sentinel))
    finished = [p for p in _finished_records(root) if p != sentinel]
    if row.code != 3:  # only a diverged run writes a finished record of its own
        touched += [str(p) for p in finished]
    clear = code == row.code and all(e.lower() in message.lower() for e in row.expect)
    return Outcome(row, code, message, clear, touched)


def run_table(work: Path, rows: list[BadInput] | None = None, echo: bool = True) -> list[Outcome]:
    outcomes = []
    for i, row in enumerate(BAD_INPUTS if rows is None else rows):
        outcome = run_bad_input(row, work / f"bad-{i:02d}")
        outcomes.append(outcome)
        if echo:
            last = next((line for line in reversed(outcome.message.splitlines())
                         if line.strip() and "_TRACEBACK" not in line and "HYDRA_FULL_ERROR" not in line), "")
            mark = "ok " if outcome.clear and not outcome.touched else "BAD"
            print(f"  {mark} exit {outcome.code}  {row.name}: {last.strip()[:150]}", flush=True)
            if outcome.touched:
                print(f"      touched: {outcome.touched}", flush=True)
    return outcomes


# -- faults on real training processes ----------------------------------------------------------
@dataclass
class Figures:
    faults_injected: int = 0
    faults_survived: int = 0
    bad_inputs_tried: int = 0
    clear_errors: int = 0
    results_lost: int = 0
    notes: list[str] = field(default_factory=list)

    def fault(self, name: str, survived: bool, detail: str = "") -> None:
        self.faults_injected += 1
        self.faults_survived += survived
        self.notes.append(f"  {'ok ' if survived else 'BAD'} {name}{': ' + detail if detail else ''}")
        print(self.notes[-1], flush=True)

    def ok(self) -> bool:
        return (self.faults_survived == self.faults_injected and self.clear_errors == self.bad_inputs_tried
                and self.results_lost == 0)

    def text(self) -> str:
        return "\n".join([
            f"faults injected     {self.faults_injected}",
            f"faults survived     {self.faults_survived}",
            f"bad inputs tried    {self.bad_inputs_tried}",
            f"clear errors given  {self.clear_errors}",
            f"results lost        {self.results_lost}",
        ])


def _start(root: Path, *extra: str, limit_file_bytes: int | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    def limits():
        if limit_file_bytes is not None:  # a disk that fills: writes past this size fail (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    flags = [e for e in extra if e.startswith("-")]  # Hydra's flags (-m) before the overrides
    environ = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    environ = {k: v for k, v in environ.items() if v != ""}  # "": unset it
    return subprocess.Popen(
        [sys.executable, "-m", "ablate.train", *flags, *TRAIN, f"trainer.results_root={root}",
         *(e for e in extra if e not in flags)], cwd=REPO,
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, preexec_fn=limits)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _folder(root: Path) -> Path | None:
    runs = root / "runs"
    # (not .hydra: a sweep's own folder)
    return next((p for p in sorted(runs.glob("*")) if p.is_dir() and not p.name.startswith(".")),
                None) if runs.exists() else None


def _record(root: Path) -> dict[str, Any] | None:
    from ablate.tracking import RunStore

    folder = _folder(root)
    return RunStore(folder).read_results() if folder else None


def _matches(root: Path, reference: dict[str, Any], ref_rows: list[dict]) -> tuple[bool, str]:
    """The run under `root` completed with the reference's metrics, epoch by epoch."""
    from ablate.tracking import RunStore

    record = _record(root)
    if record is None or record.get("status") != "completed":
        return False, f"no completed record ({record and record.get('status')})"
    diff = [k for k in COMPARED if record.get(k) != reference.get(k)]
    rows = RunStore(_folder(root)).read_metrics()
    if [r["epoch"] for r in rows] != [r["epoch"] for r in ref_rows]:
        diff.append(f"epochs {[r['epoch'] for r in rows]}")
    elif [r["train_loss"] for r in rows] != [r["train_loss"] for r in ref_rows]:
        diff.append("train_loss")
    return not diff, ("differs in " + ", ".join(diff)) if diff else f"test top-1 {record['final_test_top1']}"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _after_first_epoch(root: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until the run under `root` has checkpointed an epoch (False: it ended first)."""
    from ablate.tracking import RunStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        folder = _folder(root)
        if folder is not None and RunStore(folder).checkpoint.exists():
            return True
        time.sleep(0.2)
    return False


def _session_processes(sid: int) -> list[int]:
    """Processes still alive in the session `sid` (a started command and everything it started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                alive.append(int(stat.parent.name))
    return alive


def run_signals(work: Path, reference: dict[str, Any], ref_rows: list[dict], figures: Figures) -> None:
    """Ctrl-C and SIGTERM end a run with one line and 130 / 143 after its last checkpoint, and the same
    command resumes it to the reference's metrics; SIGTERM or SIGKILL to a joblib sweep stops its
    workers."""
    print("signals: SIGINT / SIGTERM to a run after its first epoch, SIGTERM / SIGKILL to a joblib sweep",
          flush=True)
    for sig, code_wanted in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        root = work / f"signal-{sig.name}"
        proc = _start(root)
        if not _after_first_epoch(root, proc):
            figures.fault(f"{sig.name} to a run", False, "it ended before its first epoch was checkpointed")
            continue
        proc.send_signal(sig)
        code, out = _finish(proc)
        said = out.strip().splitlines()[-1] if out.strip() else ""
        clean = (code == code_wanted and "the same command resumes" in said and "Traceback" not in out)
        code2, _ = _finish(_start(root))
        survived, detail = _matches(root, reference, ref_rows)
        figures.results_lost += not survived
        figures.fault(f"{sig.name} to a run, then the same command", clean and survived and code2 == 0,
                      f"exit {code}: {said[:110]}; then {detail}")

    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_a_sweep(work / f"signal-sweep-{sig.name}", sig, reference, figures)


def _signal_a_sweep(root: Path, sig: signal.Signals, reference: dict[str, Any], figures: Figures) -> None:
    """`sig` to a joblib sweep of 2 once a job has checkpointed an epoch: no worker may train on (with
    SIGTERM the sweep stops them and says so; SIGKILLed, it cannot, and each worker must notice it is
    gone: ablate.errors.ending_with_the_sweep), and the same command then finishes both runs."""
    from ablate.tracking import RunStore

    sweep = ["-m", "operator=dwconv,local_mlp", "launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = _start(root, *sweep)
    started = _after_first_epoch(root, proc)
    proc.send_signal(sig)
    try:  # returns once every process holding the sweep's output has ended: the workers too
        code, out = _finish(proc, timeout=120)
    except subprocess.TimeoutExpired:  # a worker trains on
        code, out = proc.wait(), ""
    time.sleep(0.5)
    orphans = _session_processes(proc.pid)
    for pid in orphans:  # leave nothing behind, whatever the verdict
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # SIGTERM: the sweep stops its workers and says so; SIGKILLed, it says nothing
    said = sig == signal.SIGKILL or "worker processes stopped" in (out.strip().splitlines() or [""])[-1]
    records = [RunStore(p).read_results() for p in (root / "runs").glob("[!.]*")]
    resumable = not any(records)  # no run recorded failed (or finished by an orphan)
    code2, out2 = _finish(_start(root, *sweep))
    dwconv = next((p for p in (root / "runs").glob("dwconv-*")), None) if (root / "runs").exists() else None
    record = RunStore(dwconv).read_results() if dwconv else None
    same = record is not None and all(record.get(k) == reference.get(k) for k in COMPARED)
    figures.results_lost += not same
    stopped = code == (-sig if sig == signal.SIGKILL else 128 + sig)  # Popen: -N for a death by signal N
    figures.fault(f"{sig.name} to a joblib sweep of 2, then the same command",
                  started and stopped and said and not orphans and resumable and code2 == 0 and same,
                  f"exit {code}, {len(orphans)} processes left, runs "
                  f"{'resumable' if resumable else 'RECORDED'}; "
                  f"then exit {code2}, dwconv {'equals' if same else 'DIFFERS FROM'} the reference")


def run_unreachable_wandb(work: Path, reference: dict[str, Any], ref_rows: list[dict],
                          figures: Figures) -> None:
    """An API key and a W&B server that refuses connections: decided at once, the run is logged offline
    (complete, for `wandb sync`) and trains as the reference did."""
    root = work / "wandb-unreachable"
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:1",
           "HOME": str(work / "wandb-home")}
    started = time.perf_counter()
    code, out = _finish(_start(root, "logger=wandb", env=env))
    wall = time.perf_counter() - started
    survived, detail = _matches(root, reference, ref_rows)
    folder = _folder(root)
    files = list((folder / "wandb").glob("offline-run-*/*.wandb")) if folder else []
    complete = len(files) == 1 and b"final_test_top1" in files[0].read_bytes()
    figures.results_lost += not survived
    figures.fault("W&B server unreachable (an API key, connections refused)",
                  code == 0 and survived and complete and out.count("cannot be reached") == 1,
                  f"{wall:.0f} s, offline run {'complete' if complete else 'MISSING OR INCOMPLETE'}; "
                  + detail)


def run_slurm(work: Path, reference: dict[str, Any], ref_rows: list[dict], figures: Figures) -> None:
    """Where a SLURM cluster answers (tests/slurm/cluster.sh starts one): a job preempted (USR2) and
    one cancelled from outside both end with the reference's metrics, each epoch recorded once; an
    impossible request exits 2 at once, naming the resource."""
    from ablate.sweep.slurm import partition_nodes, sweep_jobs

    if partition_nodes(None) is None:
        print("slurm: skipped (no SLURM cluster answers here; as root, `bash tests/slurm/cluster.sh "
              "start` starts one)", flush=True)
        return
    print("slurm: a job preempted, a job cancelled from outside, an impossible request", flush=True)
    slurm = ["-m", "operator=dwconv", "launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1"]
    for name, scancel in (("preempted (scancel --signal=USR2), requeued", ["--signal=USR2"]),
                          ("cancelled from outside (scancel), relaunched by the sweeper", [])):
        root = work / f"slurm-{'preempt' if scancel else 'cancel'}"
        proc = _start(root, *slurm)
        job = []
        if _after_first_epoch(root, proc):
            job = sweep_jobs(root / "runs" / ".hydra", "RUNNING")
            if job:
                subprocess.run(["scancel", *scancel, job[0]], check=False)
        code, out = _finish(proc)
        survived, detail = _matches(root, reference, ref_rows)
        figures.results_lost += not survived
        figures.fault(f"SLURM job {name}", bool(job) and code == 0 and survived,
                      f"job {job[0] if job else 'NOT FOUND RUNNING'}, sweep exit {code}; {detail}")
    started = time.monotonic()
    code, out = _finish(_start(work / "slurm-impossible", *slurm, "hydra.launcher.gpus_per_node=4"))
    said = next((line for line in out.splitlines() if line.startswith("error:")), "")
    figures.fault("an impossible SLURM request (4 GPUs on a CPU node)",
                  code == 2 and "gpus_per_node" in said and time.monotonic() - started < 60,
                  f"exit {code} in {time.monotonic() - started:.0f} s: {said[:100]}")


def run_faults(work: Path, kills: int, seed: int, figures: Figures) -> None:
    from ablate.tracking import RunStore

    print(f"reference: one uninterrupted run ({' '.join(TRAIN)})", flush=True)
    ref_root = work / "reference"
    started = time.perf_counter()
    code, out = _finish(_start(ref_root))
    wall = time.perf_counter() - started
    reference = _record(ref_root)
    if code != 0 or reference is None:
        raise RuntimeError(f"the reference run failed (exit {code}):\n{out[-3000:]}")
    ref_rows = RunStore(_folder(ref_root)).read_metrics()
    print(f"  {wall:.0f} s, test top-1 {reference['final_test_top1']}", flush=True)

    # the instants fall in the training phase of the reference (after start-up and data loading,
    # before the inference timing), uniformly: mid-epoch, mid-evaluation, mid-checkpoint alike
    training_from = max(0.0, wall - ref_rows[-1]["elapsed_s"] - 1.0)
    rng = random.Random(seed)
    print(f"kills: SIGKILL at {kills} random instants (seed {seed}) in {training_from:.0f}-{wall:.0f} s, "
          "then resume", flush=True)
    for k in range(kills):
        root = work / f"kill-{k}"
        delay = rng.uniform(training_from, 0.95 * wall)
        proc = _start(root)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished first: no fault was injected
            print(f"  --- kill {k} at {delay:.1f} s came after the run ended; not counted", flush=True)
            continue
        _kill_group(proc)
        done = len(RunStore(_folder(root)).read_metrics()) if _folder(root) else 0
        code, out = _finish(_start(root))
        survived, detail = _matches(root, reference, ref_rows)
        figures.results_lost += not survived
        figures.fault(f"kill {k} at {delay:.1f} s (after {done} epochs)", survived and code == 0, detail)

    def copy_of_reference(name: str) -> tuple[Path, RunStore]:
        root = work / name
        shutil.copytree(ref_root, root)
        store = RunStore(_folder(root))
        store.results.unlink()  # the run as it was just before its record: checkpoints of epochs 2, 3
        return root, store

    print("damage: checkpoints, results.json, locks, a full disk", flush=True)
    for how in ("truncated", "bit-flipped"):
        root, store = copy_of_reference(f"checkpoint-{how}")
        data = bytearray(store.checkpoint.read_bytes())
        if how == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x40
        store.checkpoint.write_bytes(bytes(data))
        code, out = _finish(_start(root))
        survived, detail = _matches(root, reference, ref_rows)
        fell_back = "falling back to checkpoint.prev.pt" in out
        figures.results_lost += not survived
        figures.fault(f"{how} checkpoint.pt", survived and fell_back,
                      detail + ("; fell back to checkpoint.prev.pt" if fell_back else "; NO FALLBACK LOGGED"))

    root, store = copy_of_reference("results-edited")
    ref_text = (_folder(ref_root) / "results.json").read_text()
    store.results.write_text(ref_text.replace('"final_test_top1": ', '"final_test_top1": 1', 1))
    code, out = _finish(_start(root))
    survived, detail = _matches(root, reference, ref_rows)
    kept = (store.folder / "results.damaged.json").exists()
    figures.results_lost += not survived
    figures.fault("edited results.json", survived and "is damaged" in out and kept,
                  detail + ("; damaged copy kept" if kept else ""))

    root, store = copy_of_reference("both-checkpoints-damaged")
    for path in (store.checkpoint, store.prev_checkpoint):
        path.write_bytes(path.read_bytes()[:1000])
    metrics_before = store.metrics.read_bytes()
    code, out = _finish(_start(root))
    clean = code == 2 and "no usable checkpoint" in out and store.metrics.read_bytes() == metrics_before
    figures.fault("both checkpoints damaged", clean, f"exit {code}, a clear error, metrics untouched"
                  if clean else out[-500:])

    root, store = copy_of_reference("locked")
    listing = {p.name: p.read_bytes() for p in store.folder.iterdir() if p.is_file() and p.name != ".lock"}
    store.lock()
    try:
        code, out = _finish(_start(root))
    finally:
        store.unlock()
    untouched = {p.name: p.read_bytes() for p in store.folder.iterdir()
                 if p.is_file() and p.name != ".lock"} == listing
    figures.fault("a second job on a locked run folder", code == 4 and untouched
                  and "another job is training" in out, f"exit {code}, folder untouched: {untouched}")

    root = work / "disk-full"
    code, out = _finish(_start(root, limit_file_bytes=2 * 2**20))  # a checkpoint is ~11 MiB
    record = _record(root)
    leftovers = [p.name for p in _folder(root).iterdir() if ".tmp-" in p.name] if _folder(root) else []
    failed_clearly = (record is not None and record["status"] == "failed"
                      and "no space left" in record.get("error", "") and not leftovers)
    code2, out2 = _finish(_start(root))
    survived, detail = _matches(root, reference, ref_rows)
    figures.results_lost += not survived
    figures.fault("disk full during training, then space again", failed_clearly and survived,
                  ("recorded failed: " + record["error"][:90] + "...; then " if failed_clearly else
                   f"record {record}, leftovers {leftovers}; ") + detail)

    run_signals(work, reference, ref_rows, figures)
    run_unreachable_wandb(work, reference, ref_rows, figures)
    run_slurm(work, reference, ref_rows, figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6, help="random SIGKILLs (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-table", action="store_true", help="skip the bad-input table")
    parser.add_argument("--no-faults", action="store_true", help="skip the training faults")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ablate-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    figures = Figures()
    started = time.perf_counter()
    if not args.no_faults:
        run_faults(work, args.kills, args.seed, figures)
    if not args.no_table:
        print(f"bad input: {len(BAD_INPUTS)} rows through the command line", flush=True)
        outcomes = run_table(work)
        figures.bad_inputs_tried = len(outcomes)
        figures.clear_errors = sum(o.clear for o in outcomes)
        figures.results_lost += sum(bool(o.touched) for o in outcomes)
    print(f"\n{figures.text()}\n({time.perf_counter() - started:.0f} s; scratch folder {work})", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if figures.ok() else 1


if __name__ == "__main__":
    run_cli(main)
