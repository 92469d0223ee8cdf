"""Operators: layouts (connectivity) x weight sources (sharing, dynamic), dispatched by registry."""
from ablate.ops import sources  # noqa: F401  (registers the built-in dynamic options)
from ablate.ops.layouts import SlidingLayout, WindowLayout, build_layout
from ablate.ops.mixer import SpatialMixer
from ablate.ops.registry import register_dynamic, register_source

__all__ = ["SpatialMixer", "SlidingLayout", "WindowLayout", "build_layout", "register_dynamic",
           "register_source"]
