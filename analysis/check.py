"""Check a written report against the results store it claims to summarise.

A report is a snapshot; the store moves on (runs finish, sweeps are re-launched). `check_tables`
recomputes the comparison and axis-effect tables from the store and compares every number of the
written CSV (to full precision) and Markdown (to its printed rounding), so a stale or hand-edited
report fails loudly. `make demo` and the tests run it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from analysis.claims import CLAIMS_FILE, CLAIMS_PRINTED, claims_table, load_claims
from analysis.comparison import COMPARISON_PRINTED, comparison_table
from analysis.downstream import TASK_METRICS, downstream_printed, downstream_table
from analysis.effects import EFFECTS_PRINTED, axis_effects
from analysis.tables import Cell, one_line, unescape_markdown
from analysis.tuning import report_runs

__all__ = ["TableMismatch", "read_markdown_table", "check_tables"]

# the columns that tell the rows apart: (numbers column, printed header)
_COMPARISON_KEYS = {"operator": "operator", "settings": "settings", "block": "block", "model": "model",
                    "data": "data", "epochs": "epochs", "train_size": "train images"}
_EFFECT_KEYS = {"axis": "axis", "from": "from", "to": "to", "from_operator": "from operator",
                "to_operator": "to operator", "settings": "settings", "block": "block", "model": "model",
                "data": "data", "epochs": "epochs", "train_size": "train images"}
_DOWNSTREAM_KEYS = {"operator": "operator", "backbone": "backbone from", "settings": "settings",
                    "model": "model", "data": "data", "epochs": "epochs", "train_size": "train images"}
_CLAIM_KEYS = {"claim": "claim", "from": "from", "to": "to", "settings": "settings", "model": "model",
               "data": "data", "epochs": "epochs", "train_size": "train images"}


# columns added to a table after reports were written with it: a CSV without one was written when the
# value could only be this (no pair left a seed out before `unpaired` was counted)
_ADDED_LATER = {"unpaired": 0}


class TableMismatch(AssertionError):
    """A number of a written table differs from the one recomputed from the store."""


def read_markdown_table(path: Path) -> pd.DataFrame:
    """The cells (strings) of the first Markdown table in `path`."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        raise TableMismatch(f"{path} holds no Markdown table")
    split = lambda line: [unescape_markdown(c.strip()) for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # noqa: E731
    header = split(lines[0])
    return pd.DataFrame([split(line) for line in lines[2:]], columns=header)


def _same(expected, found, tolerance: float | None) -> bool:
    if tolerance is None:  # a word
        return (None if pd.isna(expected) else str(expected)) == found
    if pd.isna(expected) or pd.isna(found):
        return pd.isna(expected) and pd.isna(found)
    if math.isinf(float(expected)) or math.isinf(float(found)):
        return float(expected) == float(found)
    return math.isclose(float(expected), float(found), rel_tol=1e-12, abs_tol=tolerance)


def _text(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""  # an empty cell: CSV reads an empty settings cell back as NaN
        if value.is_integer():
            return str(int(value))
    return str(value)


def _key(row, columns) -> tuple[str, ...]:
    """The row's identifying cells as text; a column the table does not print (no settings) is ""."""
    return tuple(_text(row[c]) if c in row.index else "" for c in columns)


def _check(name: str, expected: pd.DataFrame, csv_path: Path, md_path: Path, keys: dict[str, str],
           printed: dict[str, Cell]) -> int:
    """Compare one table's CSV and Markdown with `expected`; returns the number of values checked."""
    for path in (csv_path, md_path):
        if not path.is_file():
            raise TableMismatch(f"{path} is missing")
    csv = pd.read_csv(csv_path)
    md = read_markdown_table(md_path)
    want = {_key(r, list(keys)): r for _, r in expected.iterrows()}
    # Markdown holds each cell on one line (analysis.tables.one_line): its rows are found by that text
    on_one_line = {key: tuple(one_line(k) for k in key) for key in want}
    sources = {"CSV": {_key(r, list(keys)): r for _, r in csv.iterrows()},
               "Markdown": {_key(r, list(keys.values())): r for _, r in md.iterrows()}}
    checked = 0
    for source, found in sources.items():
        wanted = set(want) if source == "CSV" else set(on_one_line.values())
        if set(found) != wanted or len(found) != len(expected):
            raise TableMismatch(f"{name} ({source}): rows differ from the store: only in the report "
                                f"{sorted(set(found) - wanted)}, only in the store "
                                f"{sorted(wanted - set(found))}")
    numeric = [c for cell in printed.values() for c in cell.columns]
    for key, row in want.items():
        got = sources["CSV"][key]
        got = pd.concat([got, pd.Series({c: v for c, v in _ADDED_LATER.items() if c not in got.index},
                                        dtype=object)])
        for column in numeric:
            numeric_value = not isinstance(row[column], str)
            if not _same(row[column], got[column] if numeric_value else str(got[column]),
                         1e-12 if numeric_value else None):
                raise TableMismatch(f"{name}.csv, row {key}, {column}: report {got[column]!r}, "
                                    f"store {row[column]!r}")
            checked += 1
        cells = sources["Markdown"][on_one_line[key]]
        for header, cell in printed.items():
            for column, (value, tolerance) in zip(cell.columns, cell.parse(cells[header])):
                expected_value = one_line(row[column]) if isinstance(row[column], str) else row[column]
                if not _same(expected_value, value, tolerance):
                    raise TableMismatch(f"{name}.md, row {key}, {header!r}: report {cells[header]!r}, "
                                        f"store {row[column]!r}")
                checked += 1
    return checked


def check_tables(results_dir: str | Path, report_dir: str | Path,
                 claims_file: str | Path = CLAIMS_FILE, code: str = "separate") -> int:
    """Every number of comparison, axis_effects and claims (.csv and .md) in `report_dir`, recomputed
    from the runs under `results_dir` (the claims from `claims_file`, code versions as `code` says);
    returns how many were checked, raises TableMismatch at the first miss."""
    _, runs, tuning = report_runs(results_dir, code)  # as the report: a tuned sweep's chosen runs
    free = (tuning["setting"],) if tuning else ()
    report_dir = Path(report_dir)
    classification = runs[runs["task"] == "classification"].reset_index(drop=True)
    checked = 0
    if (classification["status"] == "completed").any():
        checked += _check("comparison", comparison_table(classification), report_dir / "comparison.csv",
                          report_dir / "comparison.md", _COMPARISON_KEYS, COMPARISON_PRINTED)
        checked += _check("axis_effects", axis_effects(classification), report_dir / "axis_effects.csv",
                          report_dir / "axis_effects.md", _EFFECT_KEYS, EFFECTS_PRINTED)
    for task in TASK_METRICS:
        table = downstream_table(runs, task)
        if not table.empty:
            checked += _check(task, table, report_dir / f"{task}.csv", report_dir / f"{task}.md",
                              _DOWNSTREAM_KEYS, downstream_printed(task))
    checked += _check("claims", claims_table(runs, load_claims(claims_file), free=free),
                      report_dir / "claims.csv", report_dir / "claims.md", _CLAIM_KEYS, CLAIMS_PRINTED)
    return checked
