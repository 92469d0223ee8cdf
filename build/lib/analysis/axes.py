"""The operator axes as the analysis sees them: their order, how they group, how they read.

Tables are ordered along the paper's axes (sparsest connectivity first, most shared first, static
first) rather than alphabetically, so that neighbouring rows differ in one step of one axis. Which
settings form one axis (channel sharing is `channels_per_group` or `groups`; connectivity comes with
its kernel size and shift) is said once, in ablate.tracking.identity.AXIS_SETTINGS.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["AXIS_COLUMNS", "ORDER", "rank", "axis_sort_key", "sort_by_axes", "axis_value_label", "is_missing"]

# The flat axis fields of a record (`OperatorSpec.axes`).
AXIS_COLUMNS = ("connectivity", "kernel_size", "shift", "spatial", "channels_per_group", "groups", "dynamic")

ORDER: dict[str, tuple[str, ...]] = {
    "connectivity": ("window", "sliding", "global"),
    "spatial": ("offset", "window", "none"),
    "dynamic": ("static", "homogeneous", "inhomogeneous", "attention"),
    "precision": ("auto", "fp32", "bf16"),  # not an axis: a flip of the effect table (identity.FLIPS)
}


def is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA all mean "not set" (records mix them after a DataFrame round trip)."""
    if value is None:
        return True
    try:
        return bool(value != value) or (isinstance(value, float) and math.isnan(value))
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return True


def rank(axis: str, value: Any) -> tuple[int, str]:
    """Known options in the paper's order; a user's registered option after them, by name."""
    options = ORDER[axis]
    return (options.index(value), "") if value in options else (len(options), str(value))


def axis_sort_key(row: Any) -> tuple:
    """Sort key of a record or a DataFrame row: connectivity, spatial sharing, dynamic, then channels."""
    cpg = row["cpg"] if "cpg" in row else None
    return (rank("connectivity", row["connectivity"]), rank("spatial", row["spatial"]),
            rank("dynamic", row["dynamic"]), math.inf if is_missing(cpg) else float(cpg))


def sort_by_axes(frame, then: tuple[str, ...] = ()):
    """`frame` ordered by the three axes, then by the `then` columns (stable, index reset)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    keys = [(axis_sort_key(row), tuple(str(row[c]) for c in then)) for _, row in frame.iterrows()]
    order = sorted(range(len(frame)), key=lambda i: keys[i])
    return frame.iloc[order].reset_index(drop=True)


def axis_value_label(axis: str, row: Any) -> str:
    """How one axis of a run reads in a table: "window 7 shifted", "8 per group", "32 groups"."""
    if axis == "precision":  # absent from the identity: auto (fp32 on a CPU)
        return str(row["settings"].get("precision", "auto"))
    if axis == "connectivity":
        kind = row["connectivity"]
        if kind == "global":
            return "global"
        return f"{kind} {row['kernel_size']}" + (" shifted" if row["shift"] is True else "")
    if axis == "channels":
        cpg, groups = row["channels_per_group"], row["groups"]
        if not is_missing(groups):
            return f"{int(groups)} groups"
        if isinstance(cpg, (list, tuple)):
            return f"[{','.join(str(c) for c in cpg)}] per group"
        return f"{cpg} per group"
    return str(row[axis])
