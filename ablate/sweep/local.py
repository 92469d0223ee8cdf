"""`launcher=submitit_local`'s job controllers, quiet on a terminal's Ctrl-C.

submitit's local executor starts a controller per job (`python -m submitit.local._local`), which starts
the job's task and waits for it. A terminal's Ctrl-C reaches every process of the terminal's group:
each controller then printed a KeyboardInterrupt traceback, and its cleanup SIGKILLed its task one
second after passing the SIGINT on, while the task was still stopping at its checkpoint. Started with
SIGINT ignored, a controller leaves the signal to its task (which has it from the terminal too, and
stops at its last checkpoint) and ends as its task ends; the sweep's own stop sends it SIGTERM, which
it passes on to its task, so a task not yet listening for SIGINT is stopped all the same.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["controllers_ignoring_sigint"]


@contextlib.contextmanager
def controllers_ignoring_sigint() -> Iterator[None]:
    """While in this block, submitit's local controllers start with SIGINT ignored."""
    try:
        from submitit.local import local
    except ImportError:  # no submitit: no controllers to start
        yield
        return
    start = local.start_controller

    def start_ignoring_sigint(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # (signal.signal's rule)
            return start(*args, **kwargs)
        # an ignored signal stays ignored across exec, a handler does not; a Ctrl-C in the few
        # milliseconds of the start is lost (pressed again, it stops the sweep)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return start(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)

    local.start_controller = start_ignoring_sigint
    try:
        yield
    finally:
        local.start_controller = start
