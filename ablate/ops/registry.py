"""The explicit dispatch from the axes to the implementation.

An operator is a weight source (what w is: learned, predicted, attention) applied by a layout (how
positions are grouped: windows or a sliding neighbourhood). Each weight source class is registered
for exactly the (dynamic option, layout, spatial sharing) cells it implements; building an operator
is one dictionary lookup, never a chain of ifs. (The official DWNet code shows why: an
`if ... if ... else` there built a static convolution for its "dynamic" model without a word.)

A user adds a dynamic option with `register_dynamic` plus `register_source` on its class, in a
module of their own, and one YAML file in `conf/dynamic/` naming that module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "LAYOUT_OF",
    "DynamicOption",
    "register_dynamic",
    "register_source",
    "dynamic_option",
    "dynamic_options",
    "weight_source_class",
]

# Which layout implements each connectivity: `global` is one window covering the whole map.
LAYOUT_OF = {"window": "windowed", "global": "windowed", "sliding": "sliding"}


@dataclass
class DynamicOption:
    """A value of the dynamic axis and the spatial sharing it supports."""

    name: str
    spatial: tuple[str, ...]
    why: str
    sources: dict[tuple[str, str], type] = field(default_factory=dict)


_DYNAMIC: dict[str, DynamicOption] = {}


def register_dynamic(name: str, *, spatial: tuple[str, ...], why: str = "") -> DynamicOption:
    """Declare a dynamic option; `spatial` lists the spatial sharing it can be combined with."""
    option = _DYNAMIC.get(name)
    if option is None:
        option = _DYNAMIC[name] = DynamicOption(name, tuple(spatial), why)
    else:  # re-registration (a module imported twice) must agree with the first
        option.spatial, option.why = tuple(spatial), why
    return option


def register_source(dynamic: str, layout: str, spatial: str) -> Callable[[type], type]:
    """Class decorator: this weight source implements (dynamic, layout, spatial)."""

    def decorate(cls: type) -> type:
        if dynamic not in _DYNAMIC:
            raise KeyError(f"register_dynamic({dynamic!r}, spatial=...) must come before its sources")
        _DYNAMIC[dynamic].sources[(layout, spatial)] = cls
        return cls

    return decorate


def dynamic_option(name: str) -> DynamicOption | None:
    return _DYNAMIC.get(name)


def dynamic_options() -> tuple[str, ...]:
    return tuple(_DYNAMIC)


def weight_source_class(dynamic: str, layout: str, spatial: str) -> type | None:
    option = _DYNAMIC.get(dynamic)
    return None if option is None else option.sources.get((layout, spatial))
