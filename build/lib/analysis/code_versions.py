"""Seeds of one experiment made by different code: kept apart, the newest kept, or pooled on purpose.

A run's experiment key covers every setting, not the code: after a kernel is changed or a bug fixed,
a relaunched sweep's new seeds share the key of the old ones. Every record names its code
(ablate/tracking/code.py: the fingerprint of the package's sources, the git commit). A code version
is a fingerprint (the commits its runs name are listed beside it), and the analysis decides what to
do where one experiment's runs come from more than one:

- `separate` (the default): each code version of an experiment is its own experiment. Its key gets
  the fingerprint, and its settings get `code`, so every table names the version wherever rows
  differ in it (the comparison's settings column) and claims and axis effects pair like with like;
- `newest`: each experiment keeps only the runs of its newest code version (the one whose latest
  run finished last); the others are left out, and the report says how many;
- `pool`: the versions are averaged together, and the report says which were pooled.

Where the whole store holds one code version nothing changes: keys, settings and tables are as
recorded.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["MODES", "by_code_version", "versions", "code_note"]

MODES = ("separate", "newest", "pool")
_DONE = "completed"


def _version(runs: pd.DataFrame) -> pd.Series:
    """Each run's code version: its fingerprint. The sources are the code; the commit only says where
    they were, so one fingerprint at two commits (a commit of the README between seeds, a dirty tree
    then committed) is one version."""
    return runs["code_fingerprint"].map(lambda found: found or "unrecorded")


def _labels(runs: pd.DataFrame) -> dict[str, str]:
    """Each version's label: its fingerprint's 8 digits and every commit its runs name (`short`'s form)."""
    labels = {}
    for version, group in runs.groupby(_version(runs), sort=False):
        named = list(dict.fromkeys(group["code"].astype(str)))
        commits = sorted({label.split(" (", 1)[1].rstrip(")") for label in named if " (" in label})
        head = named[0].split(" (", 1)[0]
        labels[version] = f"{head} ({', '.join(commits)})" if commits else head
    return labels


def versions(runs: pd.DataFrame) -> list[tuple[str, int]]:
    """(code version, completed runs made by it), oldest first by their latest run."""
    done = runs[runs["status"] == _DONE]
    if done.empty:
        return []
    version = _version(done)
    latest = done.groupby(version)["recorded_at"].max().sort_values(kind="stable")
    counts, labels = version.value_counts(), _labels(done)
    return [(labels[v], int(counts[v])) for v in latest.index]


def by_code_version(runs: pd.DataFrame, mode: str = "separate") -> pd.DataFrame:
    """The runs with `mode` applied (see the module's text); a new frame."""
    if mode not in MODES:
        raise ValueError(f"the code mode must be one of {', '.join(MODES)}; got {mode!r}")
    runs = runs.copy()
    done = runs["status"] == _DONE
    version = _version(runs)
    if mode == "pool" or version[done].nunique() <= 1:
        return runs
    if mode == "newest":
        keep = pd.Series(True, index=runs.index)
        for _, group in runs[done].groupby("experiment", dropna=False):
            newest = version[group["recorded_at"].astype(str).idxmax()]
            keep[group.index[version[group.index] != newest]] = False
        return runs[keep].reset_index(drop=True)
    labels = _labels(runs[done])
    for i in runs.index[done]:  # separate
        runs.at[i, "experiment"] = f"{runs.at[i, 'experiment']}@{version[i]}"
        settings = runs.at[i, "settings"]
        if isinstance(settings, dict):
            runs.at[i, "settings"] = {**settings, "code": labels[version[i]]}
    return runs


def code_note(every_run: pd.DataFrame, used: pd.DataFrame, mode: str) -> str:
    """What the report says of the code behind its numbers."""
    found = versions(every_run)
    if not found:
        return "No completed run."
    if len(found) == 1:
        return f"Every completed run was made by one code version: {found[0][0]}."
    listed = ", ".join(f"{label} ({n} runs)" for label, n in found)
    if mode == "separate":
        return (f"{len(found)} code versions made these runs: {listed}. Seeds made by different code are "
                "kept apart (`--code separate`): each version of an experiment is its own row, named under "
                "settings as code=..., and claims and effects pair runs of one version only.")
    if mode == "newest":
        left_out = int((every_run["status"] == _DONE).sum() - (used["status"] == _DONE).sum())
        return (f"{len(found)} code versions made these runs: {listed}. Each experiment keeps only the runs "
                f"of its newest code version (`--code newest`): {left_out} older run(s) left out.")
    return (f"{len(found)} code versions made these runs: {listed}. POOLED on request (`--code pool`): "
            "seeds made by different code are averaged together as one experiment.")
