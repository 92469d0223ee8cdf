"""The explicit dispatch from the axes to the implementation.

An operator is a weight source (what w is: learned, predicted, attention) applied by a layout (how
positions are grouped: windows or a sliding neighbourhood). Each weight source class is registered
for exactly the (dynamic option, layout, spatial sharing) cells it implements; building an operator
is one dictionary lookup, never a chain of ifs. (The official DWNet code shows why: an
`if ... if ... else` there built a static convolution for its "dynamic" model without a word.)

Which cells exist is the operator space's decision (`ablate.space.options`): a source registered for
a cell the space does not declare is refused here, and `missing_sources` lists the declared cells no
source implements (a test holds it empty for the built-in options).

A user adds a dynamic option with `register_dynamic` plus `register_source` on its class, in a
module of their own, and one YAML file in `conf/dynamic/` naming that module.
"""
from __future__ import annotations

from collections.abc import Callable

from ablate.space.options import dynamic_option, dynamic_options, register_dynamic

__all__ = ["LAYOUT_OF", "register_dynamic", "register_source", "weight_source_class", "missing_sources"]

# Which layout implements each connectivity: `global` is one window covering the whole map.
LAYOUT_OF = {"window": "windowed", "global": "windowed", "sliding": "sliding"}

_SOURCES: dict[tuple[str, str, str], type] = {}  # (dynamic, layout, spatial) -> weight source class


def register_source(dynamic: str, layout: str, spatial: str) -> Callable[[type], type]:
    """Class decorator: this weight source implements (dynamic, layout, spatial)."""
    option = dynamic_option(dynamic)
    if option is None:
        raise KeyError(f"register_dynamic({dynamic!r}, spatial=...) must come before its sources")
    kinds = [c for c, lay in LAYOUT_OF.items() if lay == layout]
    if not kinds or not any(option.defines(c, spatial) for c in kinds):
        raise ValueError(f"dynamic option {dynamic!r} is declared for spatial sharing {option.spatial} "
                         f"and connectivity {option.connectivity}: it has no {layout}/{spatial} cell to "
                         "implement")

    def decorate(cls: type) -> type:
        _SOURCES[(dynamic, layout, spatial)] = cls
        return cls

    return decorate


def weight_source_class(dynamic: str, layout: str, spatial: str) -> type | None:
    return _SOURCES.get((dynamic, layout, spatial))


def missing_sources() -> list[tuple[str, str, str]]:
    """(dynamic, connectivity, spatial) cells the space declares that no weight source implements."""
    return [(name, c, s) for name in dynamic_options() for c in dynamic_option(name).connectivity
            for s in dynamic_option(name).spatial
            if not (s == "window" and c == "sliding")  # the spatial rule: no windows to share across
            and weight_source_class(name, LAYOUT_OF[c], s) is None]
