"""Which implementation of an operator runs: the reference (the ground truth) or a fast path.

    reference  the implementations of `ablate.ops.layouts` and `ablate.ops.sources`, exactly as
               they define the operators (and as `SpatialMixer.effective_weights` reads them);
    fast       a faster kernel of the same operator where one exists for the device, dtype and size
               (see `ablate.ops.fast`), the reference everywhere else.

The choice is explicit and has three levels, the most specific winning:

1. a model's mixers: `ablate.ops.mixer.apply_backend(model, "reference")` (what
   `ablate.config.build_model` does with `ops.backend` of the config);
2. the process default: `set_backend("reference")` or the `use_backend(...)` context manager;
3. the environment: `ABLATE_OPS_BACKEND=reference` (default `fast`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BACKENDS", "check_backend", "default_backend", "resolve", "set_backend", "use_backend"]

BACKENDS = ("reference", "fast")
_default: str | None = None


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"ops.backend must be one of {BACKENDS}; got {name!r}")
    return name


def default_backend() -> str:
    """The process default: set_backend's value, else $ABLATE_OPS_BACKEND, else `fast`."""
    return _default if _default is not None else check_backend(os.environ.get("ABLATE_OPS_BACKEND", "fast"))


def set_backend(name: str | None) -> None:
    """Set the process default (None: back to the environment's)."""
    global _default
    _default = None if name is None else check_backend(name)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, mixers without a backend of their own use `name`."""
    global _default
    before, _default = _default, check_backend(name)
    try:
        yield
    finally:
        _default = before


def resolve(own: str | None) -> str:
    """A mixer's backend: its own setting, else the process default."""
    return own if own is not None else default_backend()
