"""What every layer raises and how a process stops: the bottom of the package (it imports nothing of it).

- `BadInput` and its kinds: input the user must change (a setting, a file, a path); the message says
  what. Each layer raises its own kind (ConfigError here; InvalidOperatorError, DataError,
  CheckpointError, ... where they are decided); `ablate.cli` turns every one into exit 2.
- `Interrupted`: SIGINT or SIGTERM inside `signals_raise` (`raise_if_stopping` raises it again where
  Python swallowed it); `signals_deferred` holds them back while writes that belong together
  happen; `stop_children` ends the processes a command started, and `ending_with_the_sweep` ends a
  sweep's worker (started `as_the_sweep_process`) whose sweep process is gone (SIGKILLed, it could not
  stop them).

`EXIT_CODES` are the exit statuses of every command.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

__all__ = ["EXIT_CODES", "SWEEP_PROCESS_ENV", "BadInput", "ConfigError", "Interrupted",
           "as_the_sweep_process", "at_least", "ending_with_the_sweep", "raise_if_stopping",
           "signals_deferred", "signals_raise", "stop_children"]

EXIT_CODES = {"completed": 0, "failed": 1, "bad input": 2, "diverged": 3, "locked": 4,
              "interrupted": 128 + signal.SIGINT, "terminated": 128 + signal.SIGTERM}


class BadInput(Exception):
    """Input the user must change (a setting, a file, a path); the message says what."""


class ConfigError(BadInput, ValueError):
    """Config values out of range or in conflict: every one named, with what to set instead."""


def at_least(low: int, what: str):
    """An argparse type for the commands' flags: an integer >= low, else argparse's line naming the
    flag (exit 2). A 0 must not reach `args.batch or default`, which would silently run the default."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (an integer >= {low})")
        return value
    return parse


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the process (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` records it as a failure: the run resumes from its last checkpoint)."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.message = message or (f"interrupted by {signal.Signals(signum).name}; the same command resumes "
                                   "(finished runs are kept, the others go on from their last checkpoint)")
        super().__init__(self.message)

    @property
    def code(self) -> int:
        return 128 + self.signum

    def saying(self, message: str) -> Interrupted:
        """The same interruption, told with what was interrupted and how to go on."""
        return Interrupted(self.signum, message)


_raising = 0  # how many signals_raise blocks this process is inside
_stopping: int | None = None  # the signal that asked this process to stop, inside signals_raise


def _forked_child() -> None:
    """A process forked inside signals_raise (a data loader's worker) starts with Python's own
    handlers, not ours: a Ctrl-C or SIGTERM sent to the whole process group (a terminal, scancel,
    `kill -- -PGID`) reaches the workers too, and ours made each one print an Interrupted traceback.
    With KeyboardInterrupt a PyTorch worker ends quietly, as PyTorch intends; the command itself says
    what was interrupted."""
    if _raising:
        with contextlib.suppress(ValueError):  # forked from a thread that is not the main one
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_forked_child)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside (elsewhere: unchanged)."""
    global _raising, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        global _stopping
        _stopping = signum  # for raise_if_stopping, should this exception be swallowed
        # The process stops now. A data loader's worker ended by the same signal (sent to the process
        # group) is no failure of the run: PyTorch's SIGCHLD handler would raise it as a RuntimeError
        # while Interrupted unwinds, replacing it, and the run was recorded `failed` with exit 1
        # instead of resuming from its checkpoint with 130 / 143.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    if not _raising:
        _stopping = None
    _raising += 1
    try:
        yield
    finally:
        _raising -= 1
        for s, h in previous.items():
            signal.signal(s, h)


def raise_if_stopping() -> None:
    """Raise Interrupted again if a SIGINT or SIGTERM already arrived inside signals_raise. Where
    Python ignores exceptions (a `__del__`, such as a data loader's shutting down its workers; a
    callback around a fork, such as a loader's starting them: "Exception ignored in ..."), the
    handler's Interrupted is printed and dropped, and the run trained on as if never stopped; the
    training loop calls this at every step, so no stop is lost."""
    if _raising and _stopping is not None:
        raise Interrupted(_stopping)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then arrive as usual): for writes that must
    happen together, like an epoch's metrics row and its checkpoint.

    Held by Python-level handlers, not by blocking the signals (`pthread_sigmask`): a blocked signal
    sent to the process is delivered to any other thread that does not block it (PyTorch's and
    the data loader's threads), whose arrival runs the main thread's handler at once, in the middle
    of the writes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if held:  # the first one, now, to the handler it was meant for
            signal.raise_signal(held[0])


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc; elsewhere none are found)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parent_of.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def stop_children(grace_s: float = 10.0) -> int:
    """SIGTERM every process this one started (and theirs), SIGKILL those alive after `grace_s`;
    returns how many there were. A training job ends at its last checkpoint either way. A process
    that ignores SIGTERM is neither waited for nor killed: multiprocessing's and loky's resource
    trackers (a joblib sweep's) do, by design, and end on their own once the last process holding
    their pipe (this one) has ended, cleaning up what the workers left; waiting for them held every
    stopped joblib sweep for the whole grace, then killed them before they could clean up."""
    pids = _children(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = [p for p in pids if not _ignores(p, signal.SIGTERM)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        for pid in alive:  # reap our own children, so they do not linger as zombies
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _ignores(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` ignores `sig` (its SigIgn mask in Linux's /proc; elsewhere: no)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


SWEEP_PROCESS_ENV = "ABLATE_SWEEP_PROCESS"  # the pid of the sweep whose workers (and theirs) inherit it
_watched: int | None = None  # the sweep process this one watches


@contextlib.contextmanager
def as_the_sweep_process() -> Iterator[None]:
    """While a sweep launches and follows its jobs: the processes it starts (and theirs) know it as
    their sweep (ending_with_the_sweep). Only then: a run started later from this process is no job.
    And the resource trackers it starts do not warn of "leaked semaphore objects" when it stops: a
    stopping joblib sweep SIGKILLs its workers (loky's abort), so their named locks (tqdm's) are left
    to the trackers, which clean them up as they are there to, once the sweep has exited."""
    names = (SWEEP_PROCESS_ENV, "PYTHONWARNINGS")
    before = {name: os.environ.get(name) for name in names}
    os.environ[SWEEP_PROCESS_ENV] = str(os.getpid())
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (before["PYTHONWARNINGS"],
                                                          "ignore:resource_tracker:UserWarning")))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def ending_with_the_sweep(every_s: float = 1.0) -> Iterator[None]:
    """Around a job that a sweep's launcher runs in a process of its own (joblib's workers, submitit_local's
    tasks under their controller: descendants of the sweep process, which names itself in
    SWEEP_PROCESS_ENV): SIGINT and SIGTERM raise Interrupted, and once the sweep process is gone this
    process sends itself SIGTERM; either way the job stops at its last checkpoint and the process exits. A
    sweep ended by SIGINT or SIGTERM stops its workers itself (`stop_children`); one SIGKILLed (`kill -9`,
    the OOM killer) cannot, and each worker trained its run on to the end, holding the run's lock (a
    relaunch meanwhile reported it `locked`) and its CPU or GPU. Now the job stops at its last checkpoint,
    as at a Ctrl-C, says so (nobody else is left to), and the worker exits; the same sweep command resumes
    the run. Without signals_raise, a joblib worker died of the signal wherever it was, and a
    submitit_local task ignored SIGTERM, as submitit does for SLURM's. A process the sweep did not start
    (the sweep's own, in the basic launcher; a SLURM job that inherited the variable) is left as it is.
    The ancestry is polled: a child has no portable notice of its parent's end, and a grandchild none at
    all."""
    global _watched
    try:
        sweep = int(os.environ.get(SWEEP_PROCESS_ENV, ""))
    except ValueError:
        sweep = 0
    if sweep <= 1 or not _descends_from(sweep):
        yield
        return
    if _watched != sweep:  # once per process: a joblib worker runs many jobs
        _watched = sweep
        for s in (signal.SIGINT, signal.SIGTERM):  # between jobs (inside one, signals_raise's handler)
            signal.signal(s, lambda signum, _frame: _exit_as_python_would(128 + signum))

        def watch():
            while _descends_from(sweep):  # once the sweep is gone, its children are init's or a subreaper's
                time.sleep(every_s)
            os.kill(os.getpid(), signal.SIGTERM)  # a job stops at its checkpoint; an idle worker ends

        threading.Thread(target=watch, name="ablate-end-with-the-sweep", daemon=True).start()
    try:
        with signals_raise():
            yield
        return
    except Interrupted as stop:
        if not _descends_from(sweep):  # else the sweep is stopping its workers and says so itself
            print(f"the sweep (process {sweep}) is gone: its job {stop}", file=sys.stderr)
        code = stop.code
    _exit_as_python_would(code)  # (out of the except block: the job's frames are free to collect)


def _exit_as_python_would(code: int) -> NoReturn:
    """End a launcher's worker process, from wherever in it, as a normal exit would: not back to
    the worker's loop (its sweep is gone or is stopping it), and not by the signal's default action
    (or os._exit alone), which skips the exit handlers: multiprocessing's finalizers would then leave
    the job's named semaphores (tqdm's lock) to the sweep's resource tracker to unlink."""
    gc.collect()
    atexit._run_exitfuncs()  # what the interpreter runs at exit (multiprocessing's finalizers among them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _descends_from(ancestor: int) -> bool:
    """Whether `ancestor` started this process, or started the process that did, ... (the parent
    anywhere; its ancestors where Linux's /proc tells them)."""
    pid = os.getppid()
    while pid > 1 and pid != ancestor:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return pid == ancestor
