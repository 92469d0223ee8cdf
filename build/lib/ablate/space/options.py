"""The options of the dynamic axis, declared by the operator space itself.

The first two axes are closed sets (`CONNECTIVITY_KINDS`, `SPATIAL_SHARING` in ablate.space.spec).
The dynamic axis is open: an option is declared here with the spatial sharing and the connectivity
it is defined for, and why (the rules quote it when they refuse a combination). Which module
computes an option is the implementations' business (`ablate.ops.registry.register_source`, one
weight source per layout and spatial sharing): the space decides what is valid without asking
them, and the ops layer refuses to register an implementation of a cell the space does not declare.

A user adds an option with `register_dynamic` (this module, re-exported by `ablate.ops`) and its
weight sources, in a module of their own named by `dynamic.module`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ablate.space.spec import CONNECTIVITY_KINDS, SPATIAL_SHARING

__all__ = ["DynamicOption", "register_dynamic", "dynamic_option", "dynamic_options"]


@dataclass(frozen=True)
class DynamicOption:
    """A value of the dynamic axis: the spatial sharing and connectivity it is defined for."""

    name: str
    spatial: tuple[str, ...]
    why: str = ""
    connectivity: tuple[str, ...] = CONNECTIVITY_KINDS

    def defines(self, connectivity: str, spatial: str) -> bool:
        return connectivity in self.connectivity and spatial in self.spatial


_DYNAMIC: dict[str, DynamicOption] = {}


def register_dynamic(name: str, *, spatial: tuple[str, ...], why: str = "",
                     connectivity: tuple[str, ...] = CONNECTIVITY_KINDS) -> DynamicOption:
    """Declare a dynamic option: the spatial sharing it can be combined with and the connectivity
    it is defined for (default: every kind). Declaring it again (a module imported twice) replaces
    the declaration."""
    unknown = [s for s in spatial if s not in SPATIAL_SHARING] + [
        c for c in connectivity if c not in CONNECTIVITY_KINDS]
    if unknown:
        raise ValueError(f"register_dynamic({name!r}): unknown settings {unknown}; spatial sharing is one "
                         f"of {SPATIAL_SHARING}, connectivity one of {CONNECTIVITY_KINDS}")
    _DYNAMIC[name] = option = DynamicOption(name, tuple(spatial), why, tuple(connectivity))
    return option


def dynamic_option(name: str) -> DynamicOption | None:
    return _DYNAMIC.get(name)


def dynamic_options() -> tuple[str, ...]:
    return tuple(_DYNAMIC)


# The paper's four, and why each is limited as it is.
register_dynamic("static", spatial=("offset", "window", "none"))
register_dynamic("homogeneous", spatial=("offset",),
                 why="one kernel per instance is predicted from pooled features, so it can only be "
                     "shared over positions by offset")
register_dynamic("inhomogeneous", spatial=("none",),
                 why="weights are predicted at every position, so they are never shared over positions")
register_dynamic("attention", spatial=("none",),
                 why="softmax(q.k) differs at every position, so it is never shared over positions")
