"""The results store: one folder per run, written so that nothing computed is ever lost.

    results/<sweep or "runs">/<run name>/
        config.yaml          the resolved config (written at start; secrets scrubbed)
        metrics.jsonl        one JSON line per finished epoch
        checkpoint.pt        model, optimizer, schedule and progress after the last finished epoch,
                             with the run's identity and its epoch rows (metrics.jsonl's truth)
        checkpoint.prev.pt   the checkpoint before it: the fallback when checkpoint.pt is damaged
        checkpoint.sha256    the sha256 of every good checkpoint file
        results.json         status and every summary field (written when the run ends)
        results.sha256       the sha256 of results.json
        .lock                held (flock) by the one job that trains the run

Every file that is replaced (checkpoint, results, config) is written to a temporary file, fsynced and
renamed over the old one, so a kill at any instant leaves either the old or the new version, never a
half-written one. Checksums catch what atomic writes cannot: a file truncated or overwritten later (a
copy cut short, a bad disk, a person). A damaged checkpoint falls back to the previous good one; a
damaged results.json counts as no record (the run resumes from its checkpoint and records again).

A folder holds one run: config.yaml, results.json and the checkpoints record its identity, and a
command for another identity is refused before it touches anything (`check_identity`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ablate.errors import BadInput
from ablate.tracking.identity import IdentityConflict, differing_keys, folder_conflict, identity_from_config
from ablate.tracking.secrets import scrub

__all__ = ["FINISHED", "CheckpointError", "RunLocked", "RunStore", "atomic_write_bytes", "parse_record",
           "run_folder_name", "safe_name"]

log = logging.getLogger(__name__)

# A run that ended with one of these is never trained again by a re-launch (a diverged run would
# diverge again); `failed` runs and skipped cells are retried, since the cause may have been fixed.
FINISHED = ("completed", "diverged")
# errno values that mean "the disk (or this process's share of it) is full"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(BadInput, RuntimeError):
    """No usable checkpoint although one was written: every copy fails its checksum or cannot load."""


class RunLocked(RuntimeError):
    """Another job holds the run folder's lock: two jobs must never write one run folder."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix.

    On a full disk the temporary file is removed (nothing half-written stays behind) and the error
    names the folder and what to do.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with _suppress_oserror():
            tmp.unlink()
        if err.errno in _FULL:
            raise OSError(err.errno, f"no space left to write {path} ({len(data) / 2**20:.1f} MiB; "
                          f"{os.strerror(err.errno)}): free disk space or move trainer.results_root, "
                          "then run the same command again: the run resumes from its last good "
                          "checkpoint") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def parse_record(data: bytes, digest: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for an intact results.json, (None, why not) for a damaged one.

    `digest` is the sha256 written beside it (results.sha256), None for records written before
    checksums existed: those are trusted if they parse. The most specific reason wins: a file cut
    short says so rather than only that its checksum disagrees.
    """
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"not valid JSON ({len(data)} bytes; cut short or overwritten?): {err}"
    if not isinstance(record, dict):
        return None, f"holds a JSON {type(record).__name__}, not the object of a run record"
    if digest is not None and digest != hashlib.sha256(data).hexdigest():
        return None, "changed after it was written: its sha256 disagrees with results.sha256"
    return record, None


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def safe_name(label: str) -> str:
    """One path component that cannot climb out of the results root (no /, no leading dots)."""
    return _UNSAFE.sub("_", str(label)).strip("._")[:120] or "run"


def run_folder_name(label: str, identity: dict[str, Any]) -> str:
    """A readable name plus a short hash of everything that defines the run.

    The same config always maps to the same folder (so a re-launch resumes it); two configs that
    differ in anything that matters never share one.
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{safe_name(label)}-{digest}"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class RunStore:
    """The files of one run folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = self.folder / "config.yaml"
        self.metrics = self.folder / "metrics.jsonl"
        self.checkpoint = self.folder / "checkpoint.pt"
        self.prev_checkpoint = self.folder / "checkpoint.prev.pt"
        self.checksums = self.folder / "checkpoint.sha256"
        self.results = self.folder / "results.json"
        self.results_digest = self.folder / "results.sha256"
        self.lock_file = self.folder / ".lock"
        self._lock_fd: int | None = None
        self._current_digest: str | None = None  # of checkpoint.pt, as written or verified

    # -- before anything is written -------------------------------------------------------------
    def preflight(self, needed_bytes: int) -> None:
        """Fail now, with what to change, if the run could not be recorded: the results folder is not
        a writable folder, or its disk lacks room for the checkpoints (checked before training)."""
        base = _existing_ancestor(self.folder)
        fix = "Set trainer.results_root to a writable folder with free space."
        if not base.is_dir():
            raise OSError(errno.ENOTDIR, f"cannot create the results folder {self.folder}: {base} is a "
                                         f"file, not a folder. {fix}")
        if not os.access(base, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, f"cannot write to the results folder {self.folder}: {base} is "
                                        f"not writable (permissions or a read-only file system). {fix}")
        free = shutil.disk_usage(base).free
        # a resumed run's checkpoints are replaced, not added to: the space they hold counts
        held = sum(p.stat().st_size for p in (self.checkpoint, self.prev_checkpoint) if p.is_file())
        if free < needed_bytes - held:
            raise OSError(errno.ENOSPC, f"not enough free disk space for the run in {self.folder}: "
                                        f"{free / 2**20:.1f} MiB free on the disk of {base}, the run needs "
                                        f"about {(needed_bytes - held) / 2**20:.1f} MiB more (a checkpoint, "
                                        "its previous copy and the one being written"
                                        + (f", of which {held / 2**20:.1f} MiB are there" if held else "")
                                        + "). Free space there, or "
                                        "set trainer.results_root to a folder on another disk.")

    def create(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the results folder {self.folder}: {err.strerror}. "
                                     "Set trainer.results_root to a writable folder.") from err
        probe = self.folder / f".write-probe-{os.getpid()}"
        try:  # fail now, with the folder's name, rather than after the first epoch
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise OSError(err.errno, f"cannot write to the results folder {self.folder}: {err.strerror}. "
                                     "Set trainer.results_root to a writable folder.") from err

    # -- one experiment per run folder ----------------------------------------------------------
    def recorded_identities(self) -> dict[str, dict[str, Any]]:
        """The run identity each file of the folder records, by file name: config.yaml (the resolved
        config, written when the run starts), results.json and the checkpoints. Absent or damaged
        files (their damage is reported where they are read) and files written before they carried
        an identity say nothing. Reads only: the checkpoints are memory-mapped, not read whole."""
        found = {}
        if self.config.exists():
            try:
                config = OmegaConf.to_container(OmegaConf.load(self.config))
                found[self.config.name] = identity_from_config(config, config["trainer"]["seed"])
            except Exception as err:  # noqa: BLE001  a hand-edit gone wrong: what the folder holds is unknown
                raise IdentityConflict(
                    f"{self.config} cannot be read ({type(err).__name__}: {str(err)[:200]}), so which "
                    f"experiment {self.folder} holds is unknown. Restore that file, give this run another "
                    "trainer.run_name (or trainer.sweep), or delete that folder.") from None
        record = self.read_results()
        if record is not None and isinstance(record.get("identity"), dict):
            found[self.results.name] = record["identity"]
        for path in (self.checkpoint, self.prev_checkpoint):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001  absent or damaged: load_checkpoint reports it
                continue
            if isinstance(state, dict) and isinstance(state.get("identity"), dict):
                found[path.name] = state["identity"]
        return found

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Raise IdentityConflict unless every file here that records an identity records `identity`:
        a run folder holds one run, so a command for another never resumes, overwrites or reports
        it. The records are scrubbed of secrets, so `identity` is compared scrubbed too."""
        ours = scrub(identity)
        for source, theirs in self.recorded_identities().items():
            if differing_keys(theirs, ours):
                raise folder_conflict(self.folder, source, theirs, ours)

    # -- one writer per run folder --------------------------------------------------------------
    def lock(self) -> None:
        """Take the run folder's lock for this job (released by `unlock` or when the process dies,
        even by SIGKILL: the kernel drops flock locks of a dead process). Raises RunLocked."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"another job is training the run in {self.folder} ({holder}); two jobs never "
                            "write one run folder. Wait for it to end, stop it, or give this job another "
                            "trainer.run_name or trainer.sweep.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- whole-file records ---------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.config, text.encode())

    def write_results(self, results: dict[str, Any]) -> None:
        """The record (secrets scrubbed) and its sha256 beside it. The digest goes first: a crash
        between the two writes leaves a record that fails its check, which counts as no record (the
        run is recorded again), never as a wrong one."""
        if self.results.exists() and self.read_results() is None:  # damaged: keep it for inspection
            os.replace(self.results, self.folder / "results.damaged.json")
        data = (json.dumps(scrub(results), indent=2, default=str) + "\n").encode()
        atomic_write_bytes(self.results_digest, hashlib.sha256(data).hexdigest().encode() + b"\n")
        atomic_write_bytes(self.results, data)

    def read_results(self) -> dict[str, Any] | None:
        """The record, or None when there is none or it is damaged (cut, or changed after it was
        written: its sha256 disagrees). A record without results.sha256 (written before checksums
        existed) is trusted if it parses."""
        try:
            data = self.results.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            expected = self.results_digest.read_text().strip()
        except FileNotFoundError:
            expected = None
        record, problem = parse_record(data, expected)
        if record is None:
            log.warning("%s is damaged (%s): the run counts as not recorded; it resumes from its checkpoint "
                        "and is recorded again", self.results, problem)
        return record

    def status(self) -> str | None:
        """The recorded status, or None for a run with no (intact) results.json yet."""
        results = self.read_results()
        return None if results is None else results.get("status")

    def finished(self) -> bool:
        return self.status() in FINISHED

    # -- the epoch history ----------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: that epoch reruns
                break
        return rows

    def resume_metrics(self, epoch: int, history: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """On resume at `epoch`: metrics.jsonl as of the checkpoint, and its rows. Lines after the
        checkpoint's epochs (a kill between a metrics line and its checkpoint) are dropped: those
        epochs rerun. `history`, the checkpoint's rows, is the truth: a file that disagrees with it
        (cut, edited, a line missing or added) is rebuilt from it, and said so. Checkpoints written
        before they carried a history (None) keep the file's intact rows before `epoch`."""
        rows = [r for r in self.read_metrics() if r["epoch"] < epoch] if history is None else history
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        try:
            old = self.metrics.read_bytes()
        except FileNotFoundError:
            old = b""
        if history is not None and not old.startswith(data):
            log.warning("%s was damaged or edited: rebuilt from the checkpoint (%d epochs)", self.metrics,
                        len(rows))
        if old != data:
            atomic_write_bytes(self.metrics, data)
        return rows

    # -- checkpoints ----------------------------------------------------------------------------
    def _good_digests(self) -> set[str] | None:
        """The digests of good checkpoints, or None when no checksum file exists (older runs)."""
        try:
            return set(json.loads(self.checksums.read_text())["sha256"])
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            # a damaged checksum file vouches for nothing, but condemns nothing either: the
            # checkpoints are checked as if it were absent (they must load), rather than all reported
            # damaged, with the advice to delete them and every epoch they hold
            log.warning("%s is damaged: the checkpoints are checked by loading them instead; the next "
                        "checkpoint writes it again", self.checksums)
            return None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write the new checkpoint, keeping the previous one. The order keeps a verifiable checkpoint
        on disk at every instant: (1) the checksum file names the new digest and the current one,
        (2) the current checkpoint becomes the previous, (3) the new one is written atomically."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        good = self._good_digests()
        current = self._current_digest
        if current is None and self.checkpoint.exists():
            current = self._digest_of(self.checkpoint)
        if current is not None and (good is None or current in good):
            atomic_write_bytes(self.checksums, json.dumps({"sha256": [digest, current]}).encode())
            os.replace(self.checkpoint, self.prev_checkpoint)
        else:  # no checkpoint yet, or a damaged one: it is replaced, the previous good one stays
            previous = self._digest_of(self.prev_checkpoint) if self.prev_checkpoint.exists() else None
            keep = [previous] if previous is not None and (good is None or previous in good) else []
            atomic_write_bytes(self.checksums, json.dumps({"sha256": [digest, *keep]}).encode())
        atomic_write_bytes(self.checkpoint, data)
        self._current_digest = digest

    @staticmethod
    def _digest_of(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest good checkpoint, or None when the run has none. A damaged checkpoint.pt (cut,
        overwritten, unloadable) is reported and the previous one is used; CheckpointError when a
        checkpoint exists but none is good. Loads with weights_only=True: tensors and plain data only,
        never code from the file."""
        candidates = [p for p in (self.checkpoint, self.prev_checkpoint) if p.exists()]
        if not candidates:
            return None
        good, problems = self._good_digests(), []
        for path in candidates:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if good is not None and digest not in good:
                problems.append(f"{path.name} fails its checksum ({len(data)} bytes: truncated or changed "
                                "after it was written)")
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001  any unreadable file is one more damaged copy
                problems.append(f"{path.name} cannot be loaded ({type(err).__name__}: {str(err)[:200]})")
                continue
            if problems:
                log.warning("checkpoint damaged: %s; falling back to %s (epoch %s)", "; ".join(problems),
                            path.name, state.get("epoch"))
            if path == self.checkpoint:
                self._current_digest = digest
            return state
        raise CheckpointError(
            f"no usable checkpoint in {self.folder}: {'; '.join(problems)}. Move the damaged checkpoint "
            f"files away (or delete them) to train the run from the start, or set trainer.resume=never.")
