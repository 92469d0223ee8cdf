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
    """The tuning.json of a tuned sweep's results folder, or None (not a tuned sweep: no such file).

    Raises ValueError for a file that is there but damaged: read as "not tuned", every candidate
    value would enter the tables beside the chosen one, silently."""
    path = Path(results_dir) / TUNING_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        problem = f"cannot be read: {err.strerror or err}"
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            problem = f"not valid JSON ({len(text)} characters; cut short?): {err}"
        else:
            if isinstance(data, dict) and isinstance(data.get("cells"), list):
                return data
            problem = "not an object with a list of `cells`"
    raise ValueError(f"{path} is damaged ({problem}), so the report cannot tell each cell's chosen runs "
                     f"from the other candidates. Launch the tuned sweep's command again (it trains "
                     f"nothing finished and rewrites {TUNING_FILE} from the records).")
