"""The grid of axis options: every combination of the options of the three axes.

Each cell is an OperatorSpec; `validate` decides whether it is a valid point. The `axes` sweep and
the grid test walk this, so every declared option is covered as soon as it is declared.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

from ablate.space.options import dynamic_options
from ablate.space.spec import (
    CONNECTIVITY_KINDS,
    SPATIAL_SHARING,
    Connectivity,
    Dynamic,
    OperatorSpec,
    Sharing,
)

__all__ = ["CHANNEL_OPTIONS", "axis_grid"]

# channels per weight group as one number, or a fixed number of groups (None, groups)
CHANNEL_OPTIONS = ((1, None), (32, None), (None, 1))


def axis_grid(kernel_size: int = 7, channel_options=CHANNEL_OPTIONS) -> Iterator[OperatorSpec]:
    """Every (connectivity, shift, spatial, dynamic, channel sharing) cell, valid or not."""
    connectivities = [Connectivity(k, kernel_size, shift=False) for k in CONNECTIVITY_KINDS]
    connectivities.insert(1, Connectivity("window", kernel_size, shift=True))
    for conn, spatial, kind, (cpg, groups) in itertools.product(
            connectivities, SPATIAL_SHARING, dynamic_options(), channel_options):
        dyn = Dynamic(kind, bias=kind in ("static", "homogeneous"))
        yield OperatorSpec(conn, Sharing(spatial, cpg, groups), dyn)
