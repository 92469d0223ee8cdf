"""Ctrl-C and SIGTERM: one line, exit 130 / 143 after the last checkpoint, no worker left behind, and
the same command resumes (real `python -m ablate.train` processes; ablate/errors.py)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ablate.reliability import _after_first_epoch, _finish, _record, _session_processes, _start
from ablate.tracking import RunStore


def two_epochs(results_root):
    """The config of a quick run of two epochs (a signal can land between them) in `results_root`."""
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR

    overrides = ["data.train_subset=200", "data.val_size=100", "data.test_subset=100", "schedule.epochs=2",
                 "trainer.quiet=true", "data.batch_size=50", "trainer.threads=1", "logger=none",
                 f"trainer.results_root={results_root}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


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
    workers = set(_session_processes(proc.pid)) - {proc.pid}
    proc.send_signal(signal.SIGTERM)
    got, out = _finish(proc, timeout=300)
    time.sleep(0.5)
    left = _session_processes(proc.pid)  # the sweep's session: its workers and theirs
    assert got == 143 and not left, (left, out[-3000:])
    # nothing after the sweep's line (the resource trackers, stopped, warned of "leaked semaphores")
    assert "Traceback" not in out and "worker processes stopped" in out.strip().splitlines()[-1], out
    # and those semaphores are gone: the trackers, SIGKILLed, left them in /dev/shm for good
    shm = Path("/dev/shm")
    if shm.is_dir():
        leaked = [p.name for p in shm.glob("sem.*") if any(f"-{pid}-" in p.name for pid in workers)]
        assert not leaked, leaked

    got, out = _finish(_start(tmp_path, *sweep), timeout=600)
    records = [RunStore(p).read_results() for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert got == 0 and sorted(r["status"] for r in records if r) == ["completed", "completed"], out[-3000:]


def test_the_jobs_of_a_sigkilled_sweep_stop_at_their_checkpoints(tmp_path):
    """A sweep SIGKILLed cannot stop its workers; each trained its run on to the end as an orphan
    (submitit_local's tasks ignored SIGTERM besides). Each must notice that the sweep is gone, stop at
    its last checkpoint, say so, and exit: no process left, no run recorded. (`make reliability` does
    the same to a joblib sweep, then resumes it to the reference's metrics.)"""
    import os

    sweep = ["-m", "operator=dwconv,local_mlp", "launcher=submitit_local"]
    proc = _start(tmp_path, *sweep)
    assert _after_first_epoch(tmp_path, proc), "the sweep ended before a job finished an epoch"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the jobs of the killed sweep trained on"
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 2 and not any(RunStore(p).read_results() for p in runs)  # both resume
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / ".hydra").rglob("*_log.err"))
    gone = f"the sweep (process {proc.pid}) is gone: its job interrupted at epoch"
    assert logs.count(gone) == 2 and "the same command resumes" in logs, logs[-3000:]


def test_ctrl_c_to_a_submitit_local_sweep_ends_it_with_its_one_line(tmp_path):
    """A terminal's Ctrl-C reaches every process of its group, submitit's job controllers too: each
    printed a KeyboardInterrupt traceback under the sweep's line, and SIGKILLed its task a second
    later. The controllers now leave the signal to their tasks, which stop at their checkpoints."""
    import os

    sweep = ["-m", "operator=dwconv,local_mlp", "launcher=submitit_local"]
    proc = _start(tmp_path, *sweep)  # in a session of its own: its group is the terminal's
    assert _after_first_epoch(tmp_path, proc), "the sweep ended before a job finished an epoch"
    os.killpg(proc.pid, signal.SIGINT)
    got, out = _finish(proc, timeout=300)
    time.sleep(0.5)
    left = _session_processes(proc.pid)
    assert got == 130 and not left, (left, out[-3000:])
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "worker processes stopped" in out.strip().splitlines()[-1], out[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 2 and not any(RunStore(p).read_results() for p in runs)  # both resume
    assert all(RunStore(p).checkpoint.exists() for p in runs if RunStore(p).read_metrics())


def test_a_signal_held_during_the_checkpoint_counts_the_epoch_it_saved(tmp_path, monkeypatch):
    """A signal that lands while an epoch's row and checkpoint are written waits for them, then
    arrives as the block ends: the message counts that epoch (it said "no epoch was finished", with
    epoch 1's checkpoint on disk, when the count was updated after the block; the subprocess test
    above caught it once in CI). Deterministic here: the save itself sends the signal."""
    import os

    from ablate.errors import Interrupted, signals_raise
    from ablate.training import train

    save = RunStore.save_checkpoint

    def save_then_signal(self, state):
        save(self, state)
        os.kill(os.getpid(), signal.SIGTERM)  # held: the writes' block is not done yet

    monkeypatch.setattr(RunStore, "save_checkpoint", save_then_signal)
    cfg = two_epochs(tmp_path)
    with pytest.raises(Interrupted) as stop, signals_raise():
        train(cfg)
    assert "interrupted at epoch 2 of 2 by SIGTERM; epoch 1 is checkpointed" in str(stop.value)
    folder = next((tmp_path / "runs").iterdir())
    assert len(RunStore(folder).read_metrics()) == 1 and RunStore(folder).read_results() is None


def test_signals_wait_for_the_block_whichever_thread_receives_them():
    """A signal sent to the process while another thread runs (PyTorch's, the data loader's) still
    waits for the block: blocking it in the main thread alone let the kernel hand it to the other
    thread, and the handler then ran in the middle of the block."""
    import os
    import threading

    from ablate.errors import Interrupted, signals_deferred, signals_raise

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    done = []
    try:
        with pytest.raises(Interrupted), signals_raise():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a handler run now would raise here
                done.append("block")
            done.append("after the block")  # the held signal arrives first
    finally:
        release.set()
        other.join()
    assert done == ["block"]



class _Terminal:
    """A command on a pseudo-terminal (its progress bars drawn, as in a terminal), read as it writes."""

    def __init__(self, command: list[str], **popen):
        import fcntl
        import os
        import pty
        import struct
        import subprocess
        import termios
        import threading

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 wide
        self.proc = subprocess.Popen(command, stdout=slave, stderr=slave, **popen)
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        import os

        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if pattern in self.text():
                return True
            time.sleep(0.05)
        return pattern in self.text()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        import os

        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        os.close(self.master)
        return code, self.text()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_stops_a_run_with_loader_workers_cleanly(tmp_path, sig, code):
    """A terminal's Ctrl-C and scancel signal every process of the group, the data loader's workers
    too (the real COCO, ADE20K and ImageNet loaders decode in 8 of them). Each worker printed an
    Interrupted traceback (SIGINT) or died of the signal, and PyTorch's SIGCHLD handler then raised
    "DataLoader worker ... exited unexpectedly" over the interruption: the run was recorded `failed`
    and exited 1. The signal must end it as one sent to the process alone does."""
    import os
    import subprocess
    import sys

    from ablate.reliability import REPO

    command = [sys.executable, "-m", "ablate.downstream", "task=segmentation", "task.pretrained=false",
               "data.train_subset=64", "data.val_size=32", "data.test_subset=32", "schedule.epochs=2",
               "data.in_memory=false", "data.num_workers=2", "trainer.threads=1", "logger=none",
               f"trainer.results_root={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = _Terminal(command, cwd=REPO, env=env, start_new_session=True)
    # epoch 1 is checkpointed and epoch 2 has trained a batch: its loader's workers are running
    assert run.wait_for("epoch 2/2:  25%"), run.text()[-3000:]
    os.killpg(run.proc.pid, sig)
    got, said = run.finish()
    assert got == code and "Traceback" not in said, said[-3000:]
    last = said.strip().splitlines()[-1]
    assert f"interrupted at epoch 2 of 2 by {sig.name}; epoch 1 is checkpointed" in last, said[-3000:]
    folder = next((tmp_path / "runs").iterdir())
    assert RunStore(folder).read_results() is None  # nothing recorded as failed: it resumes

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    record = RunStore(folder).read_results()
    assert again.returncode == 0 and record["status"] == "completed", again.stderr[-3000:]
    assert f"resuming {folder} at epoch 2/2" in again.stderr and record["epochs_done"] == 2


def test_a_signal_whose_exception_python_swallowed_still_stops_the_run(tmp_path, monkeypatch):
    """Where Python ignores exceptions (a `__del__`: a data loader shutting its workers down at the end
    of an iteration; a callback around a fork: one starting them), the handler's Interrupted was
    printed as "Exception ignored in ..." and dropped: the run trained on to the end as if the
    Ctrl-C had never come. The next training step raises it again."""
    import sys

    from ablate.data.memory import TensorLoader
    from ablate.errors import Interrupted, signals_raise
    from ablate.training import train

    class ShutsDownWorkers:
        def __del__(self):  # the signal arrives here, as it may in DataLoader.__del__
            signal.raise_signal(signal.SIGINT)

    iterate = TensorLoader.__iter__

    def swallowing_at_epoch_2(self):
        if self.epoch == 1:
            ShutsDownWorkers()  # deleted at once: its Interrupted is swallowed
        yield from iterate(self)

    monkeypatch.setattr(TensorLoader, "__iter__", swallowing_at_epoch_2)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)  # "Exception ignored in ..."
    cfg = two_epochs(tmp_path)
    with pytest.raises(Interrupted) as stop, signals_raise():
        train(cfg)
    assert [type(u.exc_value) for u in swallowed] == [Interrupted]  # it was swallowed once
    assert "interrupted at epoch 2 of 2 by SIGINT; epoch 1 is checkpointed" in str(stop.value)
    folder = next((tmp_path / "runs").iterdir())
    assert len(RunStore(folder).read_metrics()) == 1 and RunStore(folder).read_results() is None


def test_a_signal_after_the_last_epoch_says_so_and_the_resume_only_records(tmp_path, monkeypatch, caplog):
    """Stopped after its last epoch was checkpointed (while the inference speed was measured or the
    record written), the run said "interrupted at epoch 2 of 2", and its resume "resuming ... at
    epoch 3/2": every epoch was done, only the record was missing."""
    import logging
    import os

    import ablate.training as training
    from ablate.errors import Interrupted, signals_raise

    measure = training.inference_throughput

    def stopped_while_measuring(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return measure(*args, **kwargs)

    cfg = two_epochs(tmp_path)
    monkeypatch.setattr(training, "inference_throughput", stopped_while_measuring)
    with pytest.raises(Interrupted) as stop, signals_raise():
        training.train(cfg)
    said = str(stop.value)
    assert "after its last epoch" in said and "epochs 1-2 are checkpointed" in said, said
    assert "the same command resumes" in said and "at epoch 2 of 2" not in said, said
    folder = next((tmp_path / "runs").iterdir())
    assert RunStore(folder).read_results() is None

    monkeypatch.setattr(training, "inference_throughput", measure)
    with caplog.at_level(logging.INFO, logger="ablate.train"):
        record = training.train(cfg)
    assert record["status"] == "completed" and record["epochs_done"] == 2
    assert "epoch 3/2" not in caplog.text
    assert f"resuming {folder}: its 2 epochs are checkpointed" in caplog.text
