"""Operators: layouts (connectivity) x weight sources (sharing, dynamic), dispatched by registry."""
from ablate.ops import sources  # noqa: F401  (registers the built-in weight sources)
from ablate.ops.layouts import SlidingLayout, WindowLayout, build_layout
from ablate.ops.mixer import SpatialMixer, apply_backend
from ablate.ops.registry import register_dynamic, register_source

__all__ = ["SpatialMixer", "SlidingLayout", "WindowLayout", "apply_backend", "build_layout",
           "register_dynamic", "register_source"]
