"""The results store: one folder per run, written so that nothing computed is ever lost.

    results/<sweep or "runs">/<run name>/
        config.yaml      the resolved config (written at start)
        metrics.jsonl    one JSON line per finished epoch
        checkpoint.pt    model, optimizer, schedule and progress after the last finished epoch
        results.json     status and every summary field (written when the run ends)

Every file that is replaced (checkpoint, results, config) is written to a temporary file, fsynced and
renamed over the old one, so a kill at any instant leaves either the old or the new version.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["FINISHED", "RunStore", "atomic_write_bytes", "run_folder_name", "safe_name"]

# A run that ended with one of these is never trained again by a re-launch (a diverged run would
# diverge again); `failed` runs and skipped cells are retried, since the cause may have been fixed.
FINISHED = ("completed", "diverged")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


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


class RunStore:
    """The files of one run folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = self.folder / "config.yaml"
        self.metrics = self.folder / "metrics.jsonl"
        self.checkpoint = self.folder / "checkpoint.pt"
        self.results = self.folder / "results.json"

    def create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        probe = self.folder / f".write-probe-{os.getpid()}"
        try:  # fail now, with the folder's name, rather than after the first epoch
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise OSError(f"cannot write to the results folder {self.folder}: {err.strerror}. "
                          "Set trainer.results_root to a writable folder.") from err

    # -- whole-file records ---------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.config, text.encode())

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_bytes(self.results, (json.dumps(results, indent=2, default=str) + "\n").encode())

    def read_results(self) -> dict[str, Any] | None:
        if not self.results.exists():
            return None
        return json.loads(self.results.read_text())

    def status(self) -> str | None:
        """The recorded status, or None for a run with no results.json yet."""
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

    def keep_metrics_before(self, epoch: int) -> list[dict[str, Any]]:
        """On resume: drop lines of epochs the checkpoint does not include (they will rerun)."""
        rows = [r for r in self.read_metrics() if r["epoch"] < epoch]
        atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return rows

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint.exists():
            return None
        return torch.load(self.checkpoint, map_location="cpu", weights_only=True)
