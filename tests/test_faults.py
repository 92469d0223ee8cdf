"""Faults survived: damaged checkpoints and records, crashes inside a save, locks, full disks,
secrets, run folder names; and the fault-injection suite itself (`make reliability`), reduced."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR
from ablate.runs import run_folder
from ablate.tracking import CheckpointError, RunLocked, RunStore, atomic_write_bytes, scrub
from ablate.tracking.secrets import REDACTED, scrub_text
from ablate.training import train

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data.train_subset=300", "data.val_size=100", "data.test_subset=200", "schedule.epochs=1",
         "trainer.quiet=true", "data.batch_size=64", "trainer.threads=1", "trainer.inference_batches=1"]


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*QUICK, f"trainer.results_root={tmp_path}", *overrides])


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(epoch))}, "epoch": epoch}


# -- checkpoints ----------------------------------------------------------------------------------
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    store = RunStore(tmp_path)
    store.save_checkpoint(state(1))
    store.save_checkpoint(state(2))
    assert RunStore(tmp_path).load_checkpoint()["epoch"] == 2
    store.checkpoint.write_bytes(store.checkpoint.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        assert RunStore(tmp_path).load_checkpoint()["epoch"] == 1
    assert "checkpoint.pt fails its checksum" in caplog.text
    assert "falling back to checkpoint.prev.pt" in caplog.text


def test_a_changed_byte_is_caught_and_the_next_save_keeps_the_good_previous_one(tmp_path):
    store = RunStore(tmp_path)
    store.save_checkpoint(state(1))
    store.save_checkpoint(state(2))
    data = bytearray(store.checkpoint.read_bytes())
    data[len(data) // 2] ^= 1
    store.checkpoint.write_bytes(bytes(data))
    resumed = RunStore(tmp_path)
    assert resumed.load_checkpoint()["epoch"] == 1
    resumed.save_checkpoint(state(2))  # the damaged file is replaced, not kept as "previous"
    assert RunStore(tmp_path).load_checkpoint()["epoch"] == 2
    store.checkpoint.unlink()
    assert RunStore(tmp_path).load_checkpoint()["epoch"] == 1


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    store = RunStore(tmp_path)
    store.save_checkpoint(state(1))
    store.save_checkpoint(state(2))
    for path in (store.checkpoint, store.prev_checkpoint):
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="no usable checkpoint.*trainer.resume=never"):
        RunStore(tmp_path).load_checkpoint()


def test_a_damaged_checksum_file_does_not_condemn_good_checkpoints(tmp_path, caplog):
    """checkpoint.sha256 cut short vouches for nothing, as if absent: the checkpoints that load are
    used (not both reported damaged, with the advice to delete them and every epoch they hold)."""
    store = RunStore(tmp_path)
    store.save_checkpoint(state(1))
    store.save_checkpoint(state(2))
    store.checksums.write_text('{"sha')
    with caplog.at_level(logging.WARNING):
        assert RunStore(tmp_path).load_checkpoint()["epoch"] == 2
    assert "checkpoint.sha256 is damaged" in caplog.text
    resumed = RunStore(tmp_path)
    resumed.load_checkpoint()
    resumed.save_checkpoint(state(3))  # the checksum file is whole again, the previous one kept
    assert RunStore(tmp_path).load_checkpoint()["epoch"] == 3
    store.checkpoint.write_bytes(store.checkpoint.read_bytes()[:-100])
    assert RunStore(tmp_path).load_checkpoint()["epoch"] == 2


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_a_crash_at_any_step_of_a_save_leaves_a_good_checkpoint(tmp_path, monkeypatch, crash_at):
    """save_checkpoint is three steps (checksums, rotation, new file): kill it after each one."""
    store = RunStore(tmp_path)
    store.save_checkpoint(state(1))
    store.save_checkpoint(state(2))
    import ablate.tracking.store as store_module

    calls = {"n": 0}
    real_write, real_replace = store_module.atomic_write_bytes, os.replace

    def counting(real):
        def step(*args):
            if calls["n"] == crash_at:
                raise KeyboardInterrupt("killed")
            calls["n"] += 1
            return real(*args)
        return step

    monkeypatch.setattr(store_module, "atomic_write_bytes", counting(real_write))
    monkeypatch.setattr(store_module.os, "replace", counting(real_replace))
    with pytest.raises(KeyboardInterrupt):
        store.save_checkpoint(state(3))
    monkeypatch.undo()
    assert RunStore(tmp_path).load_checkpoint()["epoch"] in (2, 3)


def test_checkpoints_load_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    store = RunStore(tmp_path)
    store.save_checkpoint({"epoch": 1, "evil": Payload()})
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        RunStore(tmp_path).load_checkpoint()


# -- results.json -------------------------------------------------------------------------------------
def test_results_carry_a_checksum_and_a_changed_record_counts_as_none(tmp_path, caplog):
    store = RunStore(tmp_path)
    store.write_results({"status": "completed", "final_test_top1": 88.5, "nan": float("nan")})
    assert store.finished() and store.read_results()["final_test_top1"] == 88.5
    assert len(store.results_digest.read_text().strip()) == 64
    store.results.write_text(store.results.read_text().replace("88.5", "98.5"))
    with caplog.at_level(logging.WARNING):
        assert store.read_results() is None and not store.finished()
    assert "is damaged" in caplog.text
    store.write_results({"status": "completed", "final_test_top1": 88.5})
    assert store.finished() and (tmp_path / "results.damaged.json").exists()
    store.results.write_text('{"status": "compl')  # cut short
    assert store.read_results() is None
    store.results_digest.unlink()
    store.results.write_text(json.dumps({"status": "completed"}))  # written before checksums existed
    assert store.finished()


# -- full disk, unwritable folder ---------------------------------------------------------------------
def test_a_full_disk_leaves_no_half_written_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="no space left to write .*resumes from its last good checkpoint"):
        atomic_write_bytes(path, b"new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_disk_that_fills_mid_run_records_only_the_checkpointed_epochs(tmp_path, monkeypatch):
    """The second epoch's checkpoint fails to save: the record (status failed, the disk named) counts
    one epoch, its final and best numbers are epoch 0's, as the checkpoint a resume starts from holds;
    the same command then trains epoch 1 again and completes."""
    cfg = cfg_for(tmp_path, "logger=none", "schedule.epochs=2")
    real = RunStore.save_checkpoint

    def fills_at_epoch_2(self, state):
        if state["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, state)

    monkeypatch.setattr(RunStore, "save_checkpoint", fills_at_epoch_2)
    record = train(cfg)
    store = RunStore(run_folder(cfg))
    assert record["status"] == "failed" and "No space left" in record["error"]
    kept = store.load_checkpoint()
    assert kept["epoch"] == 1 and record["epochs_done"] == 1
    assert record["best_epoch"] == 0 and record["final_val_top1"] == kept["history"][-1]["val_top1"]
    monkeypatch.undo()
    resumed = train(cfg)
    assert resumed["status"] == "completed" and resumed["epochs_done"] == 2
    assert [r["epoch"] for r in store.read_metrics()] == [0, 1]


def test_preflight_names_the_problem_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="is a file, not a folder.*trainer.results_root"):
        RunStore(tmp_path / "file" / "runs" / "a").preflight(1)
    import ablate.tracking.store as store_module

    real = store_module.shutil.disk_usage
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: type(real(p))(100, 90, 10))
    with pytest.raises(OSError, match="not enough free disk space"):
        RunStore(tmp_path / "runs" / "a").preflight(10**6)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_preflight_counts_the_checkpoints_a_resumed_run_replaces(tmp_path, monkeypatch):
    """A run that fitted on its disk when it started fits when it resumes: the checkpoints already in
    its folder are replaced, not added to."""
    store = RunStore(tmp_path / "runs" / "a")
    store.create()
    store.save_checkpoint({"w": torch.zeros(2**18)})  # about 1 MiB
    held = store.checkpoint.stat().st_size
    import ablate.tracking.store as store_module

    real = store_module.shutil.disk_usage
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: type(real(p))(10**9, 10**9 - 2 * held,
                                                                                   2 * held))
    store.preflight(3 * held)  # one copy is there: two more fit
    with pytest.raises(OSError, match="not enough free disk space"):
        store.preflight(3 * held + held // 2)


def test_a_run_finished_by_another_number_of_processes_is_not_this_one(tmp_path):
    """data.batch_size is per process: a record of 2 processes is a run of twice the global batch and
    learning rate, not "already completed" for a command of 1 (nor the reverse)."""
    from ablate.tracking.identity import IdentityConflict

    cfg = cfg_for(tmp_path, "logger=none")
    assert train(cfg)["status"] == "completed"
    store = RunStore(run_folder(cfg))
    record = store.read_results()
    assert record["world_size"] == 1
    store.write_results({**record, "world_size": 2, "global_batch_size": 2 * record["global_batch_size"]})
    with pytest.raises(IdentityConflict, match="trained by 2 processes.*this job has 1.*trainer.run_name"):
        train(cfg)
    assert store.read_results()["world_size"] == 2  # untouched


# -- one writer per run folder ------------------------------------------------------------------------
def test_a_second_job_on_a_run_folder_is_refused(tmp_path):
    first, second = RunStore(tmp_path), RunStore(tmp_path)
    first.lock()
    with pytest.raises(RunLocked, match=f"another job is training the run.*pid {os.getpid()}"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_a_killed_job_releases_its_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ablate.tracking import RunStore; s = RunStore(sys.argv[1]); s.lock(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked):
        RunStore(tmp_path).lock()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunStore(tmp_path).lock()


# -- secrets and names --------------------------------------------------------------------------------
SECRET = "wk_" + "9f3c1a7e5b2d4c6a8e0f1b3d5c7a9e1f2b4d6c8a"


def test_the_scrubber_redacts_keys_env_values_and_token_shapes(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    record = {"logger": {"api_key": "abc12345", "tags": ["x", f"key={SECRET}"], "project": "ablate"},
              "note": "ghp_" + "a" * 36, "git_commit": "0123456789abcdef0123456789abcdef01234567",
              "layout": {"tokens": 49}, "hf_token": None}
    clean = scrub(record)
    assert clean["logger"]["api_key"] == REDACTED and clean["logger"]["tags"] == ["x", f"key={REDACTED}"]
    assert clean["note"] == REDACTED and clean["git_commit"] == record["git_commit"]
    assert clean["layout"] == {"tokens": 49} and clean["hf_token"] is None
    assert SECRET not in scrub_text(f"failed with {SECRET}")


def test_the_scrubber_redacts_overrides_that_name_a_secret():
    from ablate.tracking.secrets import scrub_args

    assert scrub_args(["+logger.api_key=hunter2", "data.batch_size=64", "tokens=9"]) == [
        f"+logger.api_key={REDACTED}", "data.batch_size=64", "tokens=9"]
    joined = "data.batch_size=64,logger.api_key=hunter2,operator=dwconv"  # Hydra's override_dirname
    assert scrub({"name": joined})["name"] == joined.replace("hunter2", REDACTED)


def test_the_default_config_passes_the_scrubber_unchanged(tmp_path):
    from omegaconf import OmegaConf

    cfg = cfg_for(tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert scrub(container) == container


def test_no_secret_reaches_the_config_results_log_or_wandb(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ["+logger.api_key=hunter2hunter2", "+logger.note=${oc.env:WANDB_API_KEY}",
                 f"logger.tags=[{SECRET}]"]
    cfg = cfg_for(tmp_path, *overrides)
    # the command line as ablate.train gets it: W&B records it (the run's command, uploaded by a sync)
    monkeypatch.setattr(sys, "argv", ["ablate/train.py", *overrides, "+trainer.token=abc123abc123"])
    logging.getLogger().addHandler(caplog.handler)
    from ablate.tracking.secrets import install_log_scrubber

    install_log_scrubber()
    logging.getLogger("ablate.train").warning("echo %s", SECRET)
    with caplog.at_level(logging.INFO):
        assert train(cfg)["status"] == "completed"
    folder = run_folder(cfg)
    for path in [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".pt"]:
        text = path.read_bytes()
        assert SECRET.encode() not in text and b"hunter2hunter2" not in text, path
        assert b"abc123abc123" not in text, path
    assert SECRET not in caplog.text
    assert "<redacted>" in (folder / "config.yaml").read_text()


@pytest.mark.parametrize("name", ["../../escape", "/etc", "..", ".", "a/../../b", "x" * 500, "\x00",
                                  "~root", "..%2f..%2fetc"])
def test_run_folder_names_cannot_escape_the_results_root(tmp_path, name):
    for key in ("run_name", "sweep"):
        cfg = cfg_for(tmp_path / "root", f"trainer.{key}='{name}'" if name != "\x00" else f"trainer.{key}=x")
        if name == "\x00":
            cfg.trainer[key] = name
        folder = run_folder(cfg).resolve()
        root = (tmp_path / "root").resolve()
        assert folder.is_relative_to(root) and folder != root


# -- the fault-injection suite ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # its SLURM part shares the one test cluster with tests/test_slurm.py
def test_the_reliability_suite_survives_every_fault(tmp_path):
    """`make reliability`, reduced: 2 random kills, the damage scenarios, the whole bad-input table."""
    proc = subprocess.run([sys.executable, "-m", "ablate.reliability", "--kills", "2",
                           "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    figures = dict(line.rsplit(None, 1) for line in proc.stdout.splitlines()
                   if line.startswith(("faults", "bad inputs", "clear errors", "results lost")))
    assert int(figures["results lost"]) == 0
    assert int(figures["faults injected"]) == int(figures["faults survived"]) >= 7
    assert int(figures["bad inputs tried"]) == int(figures["clear errors given"]) >= 25
