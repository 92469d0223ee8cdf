"""The operator space: one spec made of the three axes of Han et al. (ICLR 2022).

Every operator of the family is the channel-wise locally connected aggregation

    y[n, c, i] = sum over j in N(i) of  w[n, g(c), i, j] * x[n, c, j]

and a spec says which N(i) (connectivity), how w is shared (over positions and over channels) and
whether w is a parameter or computed from the input (dynamic). The spec is plain data; which
combinations are valid is decided in `ablate.space.rules` (with the options of the dynamic axis
declared in `ablate.space.options`), and which module implements a valid combination in
`ablate.ops.registry`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CONNECTIVITY_KINDS",
    "SPATIAL_SHARING",
    "Connectivity",
    "Sharing",
    "Dynamic",
    "OperatorSpec",
]

# The closed option sets of the first two axes. The dynamic axis is open: options are declared
# (`ablate.space.options.register_dynamic`), so a user can add a weight predictor of their own.
CONNECTIVITY_KINDS = ("window", "sliding", "global")
SPATIAL_SHARING = ("offset", "window", "none")


@dataclass(frozen=True)
class Connectivity:
    """Which positions j an output position i sees.

    window:  non-overlapping `kernel_size` x `kernel_size` windows (Swin); with `shift`, the blocks
             that the backbone marks as shifted roll the map by kernel_size // 2 first.
    sliding: the `kernel_size` x `kernel_size` neighbourhood around every position, zero padded.
    global:  every position sees every position.
    """

    kind: str = "sliding"
    kernel_size: int = 7
    shift: bool = False


@dataclass(frozen=True)
class Sharing:
    """How weights are shared over positions (`spatial`) and over channels.

    spatial:  offset (w depends only on j - i), window (position-specific inside a window, shared
              across windows) or none (every position has its own weights).
    channels: `channels_per_group` channels share one set of weights, given as one number for every
              stage or a list with one number per stage; or `groups`, a fixed number of weight groups
              per stage (the official I-D-DWNet reading). Exactly one of the two is set.
    """

    spatial: str = "offset"
    channels_per_group: int | tuple[int, ...] | None = 1
    groups: int | None = None

    def __post_init__(self):
        # a list per stage, as Python callers write it, is the tuple YAML's lists become (ablate.config);
        # the rules read anything else as one value for every stage
        if isinstance(self.channels_per_group, list):
            object.__setattr__(self, "channels_per_group", tuple(self.channels_per_group))


@dataclass(frozen=True)
class Dynamic:
    """Whether w is learned (`static`) or computed from the input, and the predictor's settings.

    kind:          a registered option: static, homogeneous, inhomogeneous, attention, or a user's.
    reduction:     hidden width of the weight predictors is channels // reduction (DWNet: 4).
    bias:          a learned per-channel bias added after the aggregation.
    qkv_bias:      bias on the query/key projection (attention).
    position_bias: a static relative-position bias added to the attention logits (Swin).
    module:        a Python module to import before building, where a user's option registers.
    params:        option-specific settings of a user's option.
    """

    kind: str = "static"
    reduction: int = 4
    bias: bool = True
    qkv_bias: bool = True
    position_bias: bool = True
    module: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OperatorSpec:
    """One point of the operator space."""

    connectivity: Connectivity = field(default_factory=Connectivity)
    sharing: Sharing = field(default_factory=Sharing)
    dynamic: Dynamic = field(default_factory=Dynamic)

    @property
    def axes(self) -> dict[str, Any]:
        """Flat axis values, the keys a results table or a W&B config carries."""
        cpg = self.sharing.channels_per_group
        return {
            "connectivity": self.connectivity.kind,
            "kernel_size": self.connectivity.kernel_size,
            "shift": self.connectivity.shift,
            "spatial": self.sharing.spatial,
            "channels_per_group": list(cpg) if isinstance(cpg, tuple) else cpg,
            "groups": self.sharing.groups,
            "dynamic": self.dynamic.kind,
        }


    def with_axes(self, **changes: Any) -> OperatorSpec:
        """A copy with some axis values changed, by their flat names (see `axes`)."""
        conn = {k: changes.pop(k) for k in ("kernel_size", "shift") if k in changes}
        if "connectivity" in changes:
            conn["kind"] = changes.pop("connectivity")
        shar = {k: changes.pop(k) for k in ("channels_per_group", "groups") if k in changes}
        if "spatial" in changes:
            shar["spatial"] = changes.pop("spatial")
        dyn = {"kind": changes.pop("dynamic")} if "dynamic" in changes else {}
        if changes:
            raise TypeError(f"unknown axis names {sorted(changes)}; known: {sorted(self.axes)}")
        return OperatorSpec(
            connectivity=replace(self.connectivity, **conn),
            sharing=replace(self.sharing, **shar),
            dynamic=replace(self.dynamic, **dyn),
        )

def as_tuple(value: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """Lists from YAML become tuples so that specs stay hashable."""
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)
