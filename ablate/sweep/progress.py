"""Follow a sweep in the results store: a progress line while it runs, a summary when it ends.

Launchers run jobs in this process (basic), in worker processes (joblib) or on other machines
(submitit), and a killed job returns nothing, so progress is read from the run folders: a job is done
when its results.json was written after the launch began.
"""
from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ablate.sweep.plan import Job
from ablate.tracking import FINISHED, RunStore

__all__ = ["SweepProgress", "Overall", "format_duration", "recorded_since", "summarize"]


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def recorded_since(job: Job, since: float) -> bool:
    """The job's results.json was written at or after `since` (1 s of file-time slack)."""
    try:
        return RunStore(job.folder).results.stat().st_mtime >= since - 1.0
    except FileNotFoundError:
        return False


def _say(text: str, stream=None) -> None:
    # tqdm.write clears and redraws the training bar of a job running in this process (basic
    # launcher), so a progress line never lands in the middle of it
    stream = stream or sys.stdout
    tqdm.write(text, file=stream)
    stream.flush()


@dataclass
class Overall:
    """A sweep of several phases (a tuned sweep: selection, final, followers) as one count: the
    progress line of each phase shows the whole sweep's jobs and one ETA for all of it."""

    total: int  # every job of the sweep (later phases estimated until they are planned)
    started: float = field(default_factory=time.time)
    done: int = 0  # jobs of finished phases that ended (or were found finished)
    ran: int = 0  # of them, trained in this launch: the rate behind the ETA
    counted: set = field(default_factory=set)  # their run folders: a later phase's job there is not new

    def add(self, progress: SweepProgress) -> None:
        fresh = progress.fresh_jobs()
        self.done += sum(progress.is_done(j) for j in fresh)
        self.ran += sum(j in progress.to_run and progress.ended(j) for j in fresh)
        self.counted |= {j.folder for j in fresh}


class SweepProgress:
    """Counts the jobs of one launch as their records appear; prints a line whenever one ends."""

    def __init__(self, name: str, jobs: Sequence[Job], poll_seconds: float = 2.0, say=None,
                 overall: Overall | None = None):
        # the sweep's stdout, taken now: the polling thread writes while a job in this process may
        # have redirected sys.stdout (pycocotools' index and evaluation, silenced), and the line
        # went there, lost, until the next job ended
        self.say = say or functools.partial(_say, stream=sys.stdout)
        self.name, self.jobs, self.poll_seconds = name, list(jobs), poll_seconds
        self.overall = overall
        self.to_run = [j for j in self.jobs if j.state == "run"]
        self.started = time.time()
        self._last: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading the store ----------------------------------------------------------------------
    def ended(self, job: Job) -> bool:
        """This launch's record of the job exists (an older record of a failed try does not count)."""
        return recorded_since(job, self.started)

    def is_done(self, job: Job) -> bool:
        return job.state != "run" or job.status in ("refused", "locked") or self.ended(job)

    def fresh_jobs(self) -> list[Job]:
        """This phase's jobs that no earlier phase counted (a final job that was a selection run)."""
        counted = self.overall.counted if self.overall else set()
        return [j for j in self.jobs if j.folder not in counted]

    def counts(self) -> Counter:
        ran = Counter(RunStore(j.folder).status() for j in self.to_run
                      if j.status not in ("refused", "locked") and self.ended(j))
        ran["already finished"] = sum(j.state == "finished" for j in self.jobs)
        ran["invalid"] = sum(j.state == "invalid" for j in self.jobs)
        # by the plan or by the job itself; nothing is recorded, the folder is another run's
        ran["refused"] = sum(j.status == "refused" for j in self.jobs)
        ran["locked"] = sum(j.status == "locked" for j in self.jobs)  # another job trains it
        return ran

    def line(self) -> str:
        c = self.counts()
        planned = ("already finished", "invalid", "refused", "locked")
        ran_now = sum(v for k, v in c.items() if k not in planned)
        done = ran_now + sum(c[k] for k in planned)
        total = len(self.jobs)
        elapsed = time.time() - self.started
        parts = [f"{k} {c[k]}" for k in ("completed", "failed", "diverged", "skipped") if c[k]]
        if c["already finished"]:
            parts.append(f"already finished {c['already finished']}")
        if c["invalid"]:
            parts.append(f"invalid (skipped) {c['invalid']}")
        for k in ("refused", "locked"):
            if c[k]:
                parts.append(f"{k} {c[k]}")
        left = total - done
        eta = f", about {format_duration(elapsed / ran_now * left)} left" if ran_now and left else ""
        if self.overall is not None:  # the whole sweep: its jobs, its elapsed time, its ETA
            fresh = self.fresh_jobs()
            done = self.overall.done + sum(self.is_done(j) for j in fresh)
            ran = self.overall.ran + sum(j in self.to_run and self.ended(j) for j in fresh)
            total = max(self.overall.total, done)
            elapsed, left = time.time() - self.overall.started, total - done
            eta = f", about {format_duration(elapsed / ran * left)} left" if ran and left else ""
        bar_width = 20
        filled = round(bar_width * done / total) if total else bar_width
        bar = "#" * filled + "." * (bar_width - filled)
        counts = ', '.join(parts) or 'none yet'
        of = f"jobs of the sweep done (this phase: {counts})" if self.overall else f"jobs done ({counts})"
        return f"[sweep {self.name}] [{bar}] {done}/{total} {of}; {format_duration(elapsed)} elapsed{eta}"

    # -- the polling thread ---------------------------------------------------------------------
    def report(self, force: bool = False) -> None:
        c = self.counts()
        key = tuple(sorted(c.items()))
        if force or key != self._last:
            self._last = key
            self.say(self.line())

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.report()

    def __enter__(self) -> SweepProgress:
        self.report(force=True)
        self._thread = threading.Thread(target=self._poll, name="sweep-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.report()


def summarize(name: str, jobs: Sequence[Job], seconds: float,
              sweep_dir: Path | None = None) -> dict[str, Any]:
    """The end of a sweep: how many jobs completed, were skipped (and why), failed; where they are.

    Written to `<sweep_dir>/summary.json` too, so the last launch's outcome stays with the results.
    """
    statuses = Counter()
    skipped_why: Counter = Counter()
    failures = []
    for job in jobs:
        if job.state == "finished":
            statuses[f"already {job.status}"] += 1
            continue
        # a refused job's folder holds another run's record, never its own
        record = {} if job.status == "refused" else RunStore(job.folder).read_results() or {}
        if job.status == "locked" and record.get("status") not in FINISHED:
            record = {}  # an older try's record: the job that holds the folder records this run
        status = record.get("status") or job.status or "lost"
        statuses[status] += 1
        if status == "skipped":
            skipped_why[record.get("rule") or record.get("reason") or "invalid"] += 1
        elif status in ("failed", "diverged", "lost", "refused", "locked"):
            error = record.get("error") or job.error or "the job ended without writing a record"
            failures.append({"run": job.folder.name, "status": status,
                             "error": error.strip().splitlines()[0][:300], "folder": str(job.folder)})
    summary = {"sweep": name, "jobs": len(jobs), "seconds": round(seconds, 1),
               "statuses": dict(statuses), "skipped_because": dict(skipped_why), "failures": failures}
    if sweep_dir is not None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_text(summary: dict[str, Any], results_dir: Path) -> str:
    s = summary
    lines = [f"[sweep {s['sweep']}] finished: {s['jobs']} jobs in {format_duration(s['seconds'])}: "
             + ", ".join(f"{v} {k}" for k, v in sorted(s["statuses"].items()))]
    for rule, n in sorted(s["skipped_because"].items()):
        lines.append(f"  skipped {n} x  invalid operator [{rule}]")
    for f in s["failures"]:
        lines.append(f"  {f['status']}: {f['run']}: {f['error']}")
    lines.append(f"  results: {results_dir}   report: python -m analysis.report {results_dir}")
    # a refused job needs another run_name; a diverged one is finished (a relaunch skips it, as a
    # completed one): only failed and lost jobs are trained again by the same command
    if any(f["status"] in ("failed", "lost") for f in s["failures"]):
        lines.append("  launch the same command again to retry the failed jobs; finished runs are kept")
    if any(f["status"] == "locked" for f in s["failures"]):
        lines.append("  a locked run is being trained by another job: once that job ends, the same command "
                     "trains what it left")
    return "\n".join(lines)
