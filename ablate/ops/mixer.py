"""`SpatialMixer`: one operator of the family, built from a validated spec by registry lookup."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ablate.ops import fast
from ablate.ops.backend import check_backend, resolve
from ablate.ops.layouts import build_layout
from ablate.ops.registry import LAYOUT_OF, weight_source_class
from ablate.space.rules import InvalidOperatorError, validate
from ablate.space.spec import OperatorSpec

__all__ = ["SpatialMixer", "apply_backend"]


class SpatialMixer(nn.Module):
    """y[n, c, i] = sum over j in N(i) of w[n, g(c), i, j] x[n, c, j]  (+ bias[c]).

    Args:
        spec: the point of the operator space.
        dim: channels of x.
        resolution: (H, W) of the feature map this layer sees.
        channels_per_group: channels that share one set of weights (heads are this wide).
        shifted: this layer is one of Swin's shifted ones (only with `window` connectivity and
            `connectivity.shift` on).
        context_dim: channels of the context the weights are computed from, where it is not x.
        backend: "reference" or "fast"; None follows the process default (`ablate.ops.backend`).
            Both compute the same operator; `effective_weights` always reads the reference.
    """

    def __init__(
        self,
        spec: OperatorSpec,
        dim: int,
        resolution: Sequence[int],
        channels_per_group: int | None = None,
        shifted: bool = False,
        context_dim: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        # a value given here is the spec's channel sharing for this width (AblateNet's per stage):
        # the rules check it as they check the spec's own, so one that does not divide `dim` is refused
        # (it built dim // channels_per_group groups of another width, silently)
        own = spec if channels_per_group is None else spec.with_axes(
            channels_per_group=channels_per_group, groups=None)
        (channels_per_group,) = validate(own, [dim], [tuple(resolution)])
        self.spec, self.dim, self.channels_per_group = spec, dim, channels_per_group
        self.groups = dim // channels_per_group
        conn = replace(spec.connectivity, shift=spec.connectivity.shift and shifted)
        self.layout = build_layout(conn, tuple(resolution))
        source = weight_source_class(spec.dynamic.kind, self.layout.kind, spec.sharing.spatial)
        if source is None:  # a valid point of the space (validated above) that nothing implements
            raise InvalidOperatorError(
                f"{spec.dynamic.kind} has no {self.layout.kind} implementation",
                f"dynamic option {spec.dynamic.kind!r} is declared for {spec.connectivity.kind} "
                f"connectivity with spatial {spec.sharing.spatial}, but no weight source implements it: "
                f"register one with @register_source({spec.dynamic.kind!r}, {self.layout.kind!r}, "
                f"{spec.sharing.spatial!r}), or leave that connectivity out of its "
                "register_dynamic(connectivity=...).",
                [f"connectivity={c}" for c, lay in LAYOUT_OF.items()
                 if weight_source_class(spec.dynamic.kind, lay, spec.sharing.spatial) is not None])
        self.weights = source(self.layout, dim, self.groups, spec.dynamic, context_dim or dim)
        # laid out for `resolution` (windows, shift masks, a border mask, per-position weights): a map
        # of another size would be cut into the wrong windows or read weights past their end, silently
        self.size_bound = self.layout.size_bound or self.weights.size_bound
        self.bias = nn.Parameter(torch.zeros(dim)) if spec.dynamic.bias else None
        self.backend = backend

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                value_proj: nn.Module | None = None) -> torch.Tensor:
        """y (N, C, H, W): x aggregated with weights computed from `context` (default x).

        With `value_proj`, the values are value_proj(x), x still being the default context: the Swin
        block's form (values, queries and keys all from its normed input), which lets the fast path
        compute them with one GEMM as Swin's qkv does.
        """
        self._check_size(x)
        context = x if context is None else context
        fast_path = resolve(self.backend) == "fast"
        y = fast.fused_forward(self, x, context, value_proj) if fast_path else None
        if y is None:
            values = x if value_proj is None else value_proj(x)
            w = self.weights(context, self.layout)
            y = fast.aggregate(self.layout, values, w) if fast_path else None
            if y is None:  # the reference (or no fast path for this device, dtype and size)
                y = self.layout.aggregate(values, w)
        if self.bias is None:
            return y
        # in the map's dtype, as a convolution's bias under autocast: a float32 parameter added to a
        # bf16 map would promote it, and the norm, activation and cast after the mixer would move
        # twice the bytes (on a GPU, where those steps are memory-bound)
        return y + self.bias.view(1, -1, 1, 1).to(y.dtype)

    def _check_size(self, x: torch.Tensor) -> None:
        if self.size_bound and tuple(x.shape[-2:]) != self.layout.resolution:
            (h, w), (hx, wx) = self.layout.resolution, x.shape[-2:]
            raise ValueError(f"this {type(self).__name__} ({self.layout.kind} {self.spec.dynamic.kind}, "
                             f"spatial {self.spec.sharing.spatial}) is built for a {h}x{w} map and got a "
                             f"{hx}x{wx} one: its layer is laid out for one input size; build the model "
                             "for this input (img_size) or resize the input to the model's img_size")

    @torch.no_grad()
    def _weights(self, x, context):
        return self.weights(x if context is None else context, self.layout)

    def effective_weights(
        self,
        x: torch.Tensor,
        positions: Sequence[tuple[int, int]],
        context: torch.Tensor | None = None,
        per_channel: bool = False,
    ) -> torch.Tensor:
        """The weights w[n, g, i, j] this operator applies to x, at output positions i.

        Returns (N, G, P, H, W): for each chosen position i, the map over all positions j (zero
        outside N(i)); with `per_channel`, (N, C, P, H, W), one map per channel. Computed from the
        operator's own aggregation (the derivative of y_i by x_j with the weights held fixed), so it
        shows exactly what forward applies.
        """
        self._check_size(x)  # what forward refuses has no weights to show
        w = self._weights(x, context)
        with torch.enable_grad():
            xv = x.detach().clone().requires_grad_(True)
            y = self.layout.aggregate(xv, w)
            maps = [torch.autograd.grad(y[:, :, h, c].sum(), xv, retain_graph=True)[0]
                    for h, c in positions]
        per_c = torch.stack(maps, dim=2)
        return per_c if per_channel else per_c[:, :: self.channels_per_group]

    def macs(self) -> int:
        """Multiply-accumulates per sample: computing the weights plus applying them."""
        h, w = self.layout.resolution
        if self.layout.kind == "windowed":  # padded positions are computed too
            h, w = self.layout.padded
        return self.weights.macs() + h * w * self.dim * self.layout.tokens

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, channels_per_group={self.channels_per_group}, "
                f"axes={self.spec.axes}")


def apply_backend(model: nn.Module, name: str | None) -> nn.Module:
    """Pin every SpatialMixer of `model` to `name` (None: follow the process default)."""
    if name is not None:
        check_backend(name)
    for module in model.modules():
        if isinstance(module, SpatialMixer):
            module.backend = name
    return model
