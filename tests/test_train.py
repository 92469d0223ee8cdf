"""Training runs end to end on the real Fashion-MNIST (small subsets): records, resume, failures, W&B."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

import ablate
from ablate.config import CONF_DIR
from ablate.runs import run_folder
from ablate.space.presets import PRESETS
from ablate.training import train

ROOT = Path(__file__).resolve().parent.parent
# Small and single-threaded: the same thread count in and out of process keeps CPU runs bit-for-bit.
QUICK = ["data.train_subset=600", "data.val_size=500", "data.test_subset=1000", "schedule.epochs=1",
         "trainer.quiet=true", "data.batch_size=64", "trainer.threads=1"]

RESULT_FIELDS = {
    "status", "preset", "operator", "block", "connectivity", "kernel_size", "shift", "spatial",
    "channels_per_group", "groups", "dynamic", "model", "data", "params", "params_m", "gmac",
    "best_epoch", "best_val_top1", "best_val_top5", "best_test_top1", "best_test_top5",
    "final_val_top1", "final_val_top5", "final_test_top1", "final_test_top5", "wall_time_s",
    "train_samples_per_s", "inference_samples_per_s", "peak_memory_mb", "seed", "git_commit",
    "host", "versions", "epochs", "epochs_done",
}


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*QUICK, f"trainer.results_root={tmp_path}", *overrides])


def run_cli(tmp_path: Path, *overrides: str, env: dict | None = None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "ablate.train", *QUICK, f"trainer.results_root={tmp_path}", *overrides],
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_a_run_records_config_metrics_results_and_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, "schedule.epochs=2", "data.train_subset=2000")
    results = train(cfg)
    folder = run_folder(cfg)
    assert results["status"] == "completed"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "metrics.jsonl", "results.json",
                                                  "checkpoint.pt", "wandb"}
    on_disk = json.loads((folder / "results.json").read_text())
    assert RESULT_FIELDS <= set(on_disk)
    assert on_disk["dynamic"] == "static" and on_disk["connectivity"] == "sliding"
    assert on_disk["params"] == sum(p.numel() for p in ablate.create(
        "dwconv", "micro", in_chans=1, num_classes=10).parameters())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"train_loss", "val_top1", "test_top1", "lr", "samples_per_s", "elapsed_s"} <= set(rows[0])
    assert on_disk["final_test_top1"] == rows[-1]["test_top1"]
    assert on_disk["best_val_top1"] == max(r["val_top1"] for r in rows)
    # 2 x 15 steps on real images: far above chance (10%). Fewer steps leave BatchNorm's running
    # statistics too far behind for the evaluation of a dwnet block to mean anything.
    assert rows[-1]["test_top1"] > 40
    # the offline W&B run carries the axes as flat keys beside the nested config
    wandb_files = list((folder / "wandb").rglob("*.wandb"))
    assert wandb_files and b"axes/dynamic" in wandb_files[0].read_bytes()


def test_test_split_after_the_last_epoch_only(tmp_path):
    """trainer.test_every_epoch=false (the study): the test split is evaluated once, after the last
    epoch; every other number is the one an every-epoch run measures (trainer.* is not identity)."""
    every = train(cfg_for(tmp_path / "every", "schedule.epochs=2", "logger=none"))
    cfg = cfg_for(tmp_path / "last", "schedule.epochs=2", "logger=none", "trainer.test_every_epoch=false")
    last = train(cfg)
    rows = [json.loads(line) for line in (run_folder(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_top1"] is None for r in rows] == [True, False]
    for key in ("final_test_top1", "final_test_top5", "final_val_top1", "best_val_top1", "best_epoch"):
        assert last[key] == every[key], key
    assert last["best_test_top1"] == (every["best_test_top1"] if last["best_epoch"] == 1 else None)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains(tmp_path, preset):
    cfg = cfg_for(tmp_path, f"operator={preset}", "data.train_subset=400", "schedule.epochs=2",
                  "logger=none")
    results = train(cfg)
    assert results["status"] == "completed"
    rows = [json.loads(line) for line in (run_folder(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < 2.31  # it learns (chance: ln 10 = 2.303)


def test_cpu_runs_repeat_bit_for_bit(tmp_path):
    a = train(cfg_for(tmp_path / "a", "logger=none"))
    b = train(cfg_for(tmp_path / "b", "logger=none"))
    keys = ("final_test_top1", "final_val_top1", "best_val_top1")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    rows = [json.loads(p.read_text().splitlines()[0]) for p in tmp_path.rglob("metrics.jsonl")]
    assert rows[0]["train_loss"] == rows[1]["train_loss"]


def test_a_completed_run_is_not_trained_again(tmp_path):
    cfg = cfg_for(tmp_path, "logger=none")
    first = train(cfg)
    stamp = (run_folder(cfg) / "results.json").stat().st_mtime_ns
    proc = run_cli(tmp_path, "logger=none")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "already completed" in err
    assert (run_folder(cfg) / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((run_folder(cfg) / "results.json").read_text()) == first


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = ["schedule.epochs=3", "data.train_subset=1500", "logger=none"]
    proc = run_cli(tmp_path / "ref", *overrides)
    assert proc.wait(timeout=300) == 0
    reference = json.loads(next((tmp_path / "ref").glob("runs/*/results.json")).read_text())
    proc = run_cli(tmp_path / "killed", *overrides)
    metrics = next((tmp_path / "killed").glob("runs/*/metrics.jsonl"), None)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until epoch 1 is checkpointed and epoch 2 has begun
        metrics = next((tmp_path / "killed").glob("runs/*/metrics.jsonl"), None)
        if metrics is not None and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metrics is not None and metrics.read_text().count("\n") < 3, "killed too late to test"
    proc = run_cli(tmp_path / "killed", *overrides)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming" in err
    resumed = json.loads(next((tmp_path / "killed").glob("runs/*/results.json")).read_text())
    for key in ("final_test_top1", "final_test_top5", "final_val_top1", "best_val_top1", "best_epoch"):
        assert resumed[key] == reference[key], key
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_a_nan_loss_ends_the_run_as_diverged(tmp_path, monkeypatch):
    import ablate.tasks.classification as classification

    real_build = classification.build_model

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = {"n": 0}

        def nan_after_three(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] > 3 and module.training else output

        model.head.register_forward_hook(nan_after_three)
        return model

    monkeypatch.setattr(classification, "build_model", poisoned)
    cfg = cfg_for(tmp_path, "logger=none", "schedule.epochs=2", "data.train_subset=300")
    results = train(cfg)
    assert results["status"] == "diverged"
    assert results["diverged_step"] == 3
    assert "diverged" in results["error"]
    saved = json.loads((run_folder(cfg) / "results.json").read_text())
    assert saved["status"] == "diverged"


def test_wandb_disabled_writes_no_wandb_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = cfg_for(tmp_path)
    assert train(cfg)["status"] == "completed"
    assert not list(tmp_path.rglob("wandb"))


class _WandbLike:
    """W&B's summary as its service builds it: a row logged with `step=` waits until another step is
    logged, a commit or the run's finish, and then writes its keys into the summary, as an explicit
    summary update does; the later write wins."""

    def __init__(self):
        self.summary_seen, self.pending = {}, None
        self.summary = self

    def init(self, **_):
        return self

    def Settings(self, **_):  # noqa: N802  (wandb.Settings)
        return None

    def _flush(self):
        if self.pending is not None:
            self.summary_seen.update(self.pending[1])
            self.pending = None

    def log(self, data, step=None, commit=None):
        if self.pending is not None and self.pending[0] != step:
            self._flush()
        self.pending = (step, {**(self.pending[1] if self.pending else {}), **data})
        if commit or step is None:
            self._flush()

    def update(self, values):
        self.summary_seen.update(values)

    def finish(self, exit_code=0):
        self._flush()


def test_the_wandb_summary_ends_as_the_record_says(tmp_path, monkeypatch):
    """The last epoch's row, logged with step= and not committed, reached W&B at finish, after the
    record's summary, and its `lr` (the last epoch's rate) replaced the record's (the run's rate):
    the mirror's table differed from the store's. Each row is committed when logged."""
    fake = _WandbLike()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = train(cfg_for(tmp_path))
    assert results["status"] == "completed"
    assert fake.summary_seen["lr"] == results["lr"] and fake.summary_seen["status"] == "completed"
    assert fake.summary_seen["code/fingerprint"] == results["code"]["fingerprint"]


class _WandbRuns:
    """W&B as a resumed run meets it: each init is a run of its own (offline, a new offline-run folder
    with the same id, whose `wandb sync` replaces the earlier one's history), starting at the step the
    server says it holds (`starting_step`: 0 offline); each run's logged steps are kept."""

    def __init__(self, starting_step=0):
        self.runs, self.starting_step = [], starting_step

    def init(self, **kwargs):
        run = SimpleNamespace(id=kwargs["id"], steps=[], starting_step=self.starting_step,
                              summary={}, finish=lambda exit_code=0: None)
        run.log = lambda data, step=None, commit=None: run.steps.append((step, data["epoch"]))
        self.runs.append(run)
        return run

    def Settings(self, **_):  # noqa: N802  (wandb.Settings)
        return None


@pytest.mark.parametrize("held", [0, 1], ids=["offline", "online-resumed"])
def test_a_resumed_run_gives_its_wandb_run_every_epoch_once(tmp_path, monkeypatch, held):
    """Killed after epoch 1 of 3 and resumed: the resumed W&B run held epochs 2 and 3 only. Offline,
    its offline-run folder is a second one of the same id, and `wandb sync` of both (the README's
    command) keeps one folder's history: epoch 1 was lost from W&B. The resumed run now logs the
    checkpoint's epochs too, those the W&B run does not hold yet (online, the server holds them)."""
    import ablate.training as training
    from ablate.errors import Interrupted

    cfg = cfg_for(tmp_path, "logger=wandb", "schedule.epochs=3", "data.train_subset=300",
                  "data.val_size=100", "data.test_subset=200")
    real = training.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if args[5] == 1:  # the epoch
            raise Interrupted(signal.SIGINT)
        return real(*args, **kwargs)

    fake = _WandbRuns()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(training, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(Interrupted):
        train(cfg)
    monkeypatch.setattr(training, "train_one_epoch", real)
    first = fake.runs[0].steps
    assert [epoch for _, epoch in first] == [1]
    fake.starting_step = first[-1][0] + 1 if held else 0  # a server resumes after its last step
    assert train(cfg)["status"] == "completed"
    steps = [json.loads(row)["step"] for row in (run_folder(cfg) / "metrics.jsonl").read_text().splitlines()]
    resumed = fake.runs[1]
    assert resumed.id == fake.runs[0].id
    assert resumed.steps == list(zip(steps, [1, 2, 3]))[held:]


def test_a_run_trained_again_from_scratch_gets_a_wandb_run_of_its_own(tmp_path, monkeypatch):
    """The W&B run id was a hash of the run folder's path, so a run replaced as the README says (delete
    the folder, or trainer.resume=never) resumed the replaced run's W&B run: online its history kept
    the old run's curves and refused the new one's steps (not above the old last step). The id is
    drawn when a run starts from scratch and kept in its checkpoints for its resumes."""
    import shutil

    fake = _WandbRuns()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = cfg_for(tmp_path, "logger=wandb", "data.train_subset=300", "data.val_size=100",
                  "data.test_subset=200")
    assert train(cfg)["status"] == "completed"
    shutil.rmtree(run_folder(cfg))
    assert train(cfg)["status"] == "completed"
    ids = [run.id for run in fake.runs]
    assert len(ids) == 2 and ids[0] != ids[1], ids  # (a resume keeps its id: the test above)


def test_a_mode_wandb_does_not_know_is_bad_input_naming_where_it_was_set(monkeypatch):
    """WANDB_MODE=foo was reported as `logger.mode must be ...` (a setting the user never gave) and, in
    a sweep, as a ValueError's traceback with exit 1: it is a ConfigError (exit 2) naming its source."""
    from ablate.errors import ConfigError
    from ablate.tracking.wandb_logger import resolve_mode

    monkeypatch.setenv("WANDB_MODE", "foo")
    with pytest.raises(ConfigError, match=r"WANDB_MODE=foo .*unset WANDB_MODE"):
        resolve_mode(None)
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(ConfigError, match=r"^logger.mode=foo"):
        resolve_mode("foo")
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name of offline
    assert resolve_mode("online") == "offline"


@pytest.mark.parametrize("machine", ["api.wandb.ai", "api.forge.coreweave.com"])
@pytest.mark.parametrize("where", ["home", "NETRC"])
def test_the_key_wandb_login_stored_makes_the_mode_online(tmp_path, monkeypatch, machine, where):
    """`logger=wandb` is online with an API key. The key `wandb login` stores is a .netrc entry for the
    server W&B uses by default, which is no longer api.wandb.ai (CoreWeave's proxy of it, since
    wandb 0.2x), in the file $NETRC names if set: only ~/.netrc's api.wandb.ai counted, so a user who
    had logged in got offline runs, silently."""
    import ablate.tracking.wandb_logger as wandb_logger

    netrc = tmp_path / ("netrc" if where == "NETRC" else ".netrc")
    netrc.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    if where == "NETRC":
        monkeypatch.setenv("NETRC", str(netrc))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(wandb_logger, "server_unreachable", lambda: None)  # no server asked here
    assert wandb_logger.resolve_mode(None) == "online"
    netrc.write_text("machine example.org\n  login user\n  password secret\n")
    assert wandb_logger.resolve_mode(None) == "offline"


def test_an_unknown_wandb_mode_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch):
    from ablate.errors import ConfigError

    monkeypatch.setenv("WANDB_MODE", "foo")
    with pytest.raises(ConfigError, match="WANDB_MODE=foo"):
        train(cfg_for(tmp_path, "logger=wandb"))
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_an_unreachable_wandb_server_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = cfg_for(tmp_path, "logger.init_timeout=15")
    assert train(cfg)["status"] == "completed"
    assert "x" * 40 not in (run_folder(cfg) / "config.yaml").read_text()
    assert "x" * 40 not in (run_folder(cfg) / "results.json").read_text()


def test_invalid_axes_fail_before_any_data_loads(tmp_path):
    proc = run_cli(tmp_path, "dynamic=attention", "data.root=/nonexistent")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "attention needs spatial: none" in err
    assert not list(tmp_path.rglob("*"))


def test_cfg_job_and_defaults_tree(tmp_path):
    proc = run_cli(tmp_path, "--cfg", "job", "--resolve")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "name: fashion_mnist" in out
    assert "kernel_size: 3" in out and "window: 3" in out  # the kernel follows the model size's window
    proc = run_cli(tmp_path, "--info", "defaults-tree")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "operator: dwconv" in out and "data: fashion_mnist" in out


def test_ablate_device_pins_what_auto_means(monkeypatch):
    """trainer.device=auto (and the bench's --device auto) reads ABLATE_DEVICE where it is set; a
    value this machine cannot run is refused naming the variable, as trainer.device would be. The
    suite itself runs with ABLATE_DEVICE=cpu (conftest), so its CPU tests test the CPU on a GPU
    machine too."""
    from ablate.distributed import DEVICE_ENV, checked_device
    from ablate.errors import ConfigError

    assert os.environ[DEVICE_ENV] == "cpu" and checked_device("auto", "trainer.device") == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ConfigError, match=r"ABLATE_DEVICE=tpu: ablate runs on cpu.*device=auto reads"):
        checked_device("auto", "trainer.device")
    assert checked_device("cpu", "trainer.device") == torch.device("cpu")  # an explicit device wins
    monkeypatch.setenv(DEVICE_ENV, "cuda:7")
    with pytest.raises(ConfigError, match=r"ABLATE_DEVICE=cuda:7.*--device auto reads ABLATE_DEVICE"):
        checked_device("auto", "--device")
    found = "cuda" if torch.cuda.is_available() else "cpu"
    for unset in ("", "auto"):
        monkeypatch.setenv(DEVICE_ENV, unset)
        assert checked_device("auto", "trainer.device").type == found


def test_a_run_under_ablate_device_records_that_device(tmp_path):
    """The variable reaches a training command (a process of its own): refused there with exit 2
    where this machine lacks the device, and the record says where the run trained."""
    refused = run_cli(tmp_path, "logger=none", env={"ABLATE_DEVICE": "tpu"})
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "error: ABLATE_DEVICE=tpu" in err, err[-2000:]
    proc = run_cli(tmp_path, "logger=none", env={"ABLATE_DEVICE": "cpu"})
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    (record,) = tmp_path.glob("runs/*/results.json")
    assert json.loads(record.read_text())["device"] == "cpu"


def test_a_run_is_resumed_only_in_the_precision_it_started_in(tmp_path):
    """A run stopped after its last epoch (its record not yet written) resumes by writing it; one whose
    checkpoint was trained in bf16 (a GPU at precision=auto, or under ABLATE_DEVICE=cuda) is refused on
    the CPU, which computes in fp32, exit 2 and nothing written: its epochs would mix precisions. The
    record names the processor and precision, and the checkpoint the precision."""
    from ablate.tracking import RunStore

    assert run_cli(tmp_path, "logger=none").wait(timeout=300) == 0
    (record,) = tmp_path.glob("runs/*/results.json")
    first = json.loads(record.read_text())
    assert first["precision_used"] == "fp32" and first["processor"]
    store = RunStore(record.parent)
    checkpoint = store.load_checkpoint()
    assert checkpoint["precision_used"] == "fp32"
    rows = store.read_metrics()
    assert rows[0]["processor"] == first["processor"] and rows[0]["first_of_process"] is True

    for name in ("results.json", "results.sha256"):  # stopped before its record
        (record.parent / name).unlink()
    store.save_checkpoint({**checkpoint, "precision_used": "bf16"})
    refused = run_cli(tmp_path, "logger=none")
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2, err[-2000:]
    assert "trained in bf16, this job computes in fp32" in err and "trainer.device=cuda" in err, err[-2000:]
    assert not record.exists()

    store.save_checkpoint({**checkpoint, "precision_used": "fp32"})
    resumed = run_cli(tmp_path, "logger=none")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming" in err, err[-2000:]
    assert json.loads(record.read_text())["train_samples_per_s"] == first["train_samples_per_s"]


def test_train_speed_is_the_record_s_processor_s_warm_epochs():
    """The record's train img/s belongs to its `processor`: a run resumed on another machine is timed
    by the epochs this one trained, without each process's first (warm-up) epoch where others remain;
    rows of earlier code (no processor, no flag) leave out the run's first epoch, as that code did."""
    from ablate.training import train_speed

    def row(speed, processor=None, first=None):
        return {"samples_per_s": speed} | ({"processor": processor} if processor else {}) \
            | ({"first_of_process": first} if first is not None else {})

    assert train_speed([row(10), row(100), row(200)], "cpu") == 150  # as before: epoch 1 left out
    assert train_speed([row(10)], "cpu") == 10
    assert train_speed([], "cpu") is None
    moved = [row(10, "cpu", True), row(100, "cpu", False), row(50, "gpu", True), row(2000, "gpu", False),
             row(3000, "gpu", False)]
    assert train_speed(moved, "gpu") == 2500 and train_speed(moved, "cpu") == 100
    assert train_speed(moved[:3], "gpu") == 50  # its only epoch on this processor, warm-up and all
    # a process that resumed twice on one machine: each first epoch left out
    twice = [row(10, "cpu", True), row(100, "cpu", False), row(20, "cpu", True), row(120, "cpu", False)]
    assert train_speed(twice, "cpu") == 110


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_a_gpu_run_uses_bf16_and_channels_last(tmp_path):
    results = train(cfg_for(tmp_path, "logger=none", "trainer.device=cuda"))
    assert results["status"] == "completed" and results["device"].startswith("cuda")
    # the depth-wise convolutions' GPU route, timed at their first call, named in the record
    assert results["fast_paths"] and all(" | static | " in k for k in results["fast_paths"])


def test_a_sweep_file_without_minus_m_is_refused(tmp_path):
    """`sweeps=demo` names a grid; without -m Hydra would train its first job, silently."""
    proc = run_cli(tmp_path, "sweeps=demo")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert "-m sweeps=demo" in err and "grid of runs" in err
    assert not any(tmp_path.rglob("results.json"))


def _bars_output(tmp_path: Path, tty: bool) -> bytes:
    """What a small run writes to stderr and stdout, into a file (a log, as under nohup or SLURM) or
    into a terminal (a pseudo-terminal, read until the run ends)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    command = [sys.executable, "-m", "ablate.train", *QUICK, "trainer.quiet=false", "data.train_subset=300",
               "data.val_size=100", "data.test_subset=100", "logger=none", f"trainer.results_root={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    tmp_path.mkdir(parents=True)
    if not tty:
        log = tmp_path / "log.txt"
        with open(log, "wb") as f:
            assert subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=f, timeout=300).returncode == 0
        return log.read_bytes()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():  # the terminal must be read while the run writes, or its writes block
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(master)
    return b"".join(chunks)


def test_a_log_file_gets_lines_and_a_terminal_gets_progress_bars(tmp_path):
    """Redirected to a file (nohup, SLURM's output file) the epoch bar wrote a carriage-return frame
    per refresh into the log: thousands of them in a long run. A log gets the epoch lines only; a
    terminal still gets the bar."""
    logged = _bars_output(tmp_path / "log", tty=False)
    assert b"epoch 1/1  loss" in logged and b"\r" not in logged, logged[-2000:]
    shown = _bars_output(tmp_path / "tty", tty=True)
    assert b"epoch 1/1:" in shown and b"\r" in shown and b"epoch 1/1  loss" in shown, shown[-2000:]
