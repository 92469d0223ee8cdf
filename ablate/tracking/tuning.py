"""`tuning.json`: a tuned sweep's record of its selection, in the results store beside its runs.

The sweeper writes it (ablate/sweep/tuning.py decides the choice); the analysis reads it to use only
the chosen runs. The file is written whole (to a temporary name, then renamed), so a reader never
sees half of it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TUNING_FILE", "read_tuning", "write_tuning"]

TUNING_FILE = "tuning.json"


def write_tuning(results_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(results_dir) / TUNING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def read_tuning(results_dir: str | Path) -> dict[str, Any] | None:
    """The tuning.json of a tuned sweep's results folder, or None (not a tuned sweep, or unreadable)."""
    path = Path(results_dir) / TUNING_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("cells"), list) else None
