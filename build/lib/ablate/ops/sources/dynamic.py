"""The two dynamic options of DWNet: weights predicted from the input by a small conv net.

homogeneous:   per instance, shared over positions: pooled features -> 1x1 conv, BN, ReLU, 1x1 conv
               -> one kernel (a table of offsets) per group (dynamic depth-wise convolution).
inhomogeneous: per instance and per position: the same predictor applied at every position -> the
               weights over that position's neighbours (I-D-DW conv; involution's form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ablate.ops.registry import register_source
from ablate.ops.sources.base import WeightSource, predictor_head


class _Homogeneous(WeightSource):
    """Pool, then predict `entries` weights per group (the official DynamicDWConv predictor)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim, entries: int):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.entries = entries
        self.predict = predictor_head(context_dim, self.hidden, groups * entries, first_bias=False)

    def predicted(self, context: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(context, 1)
        return self.predict(pooled).reshape(context.shape[0], self.groups, self.entries)

    def macs(self) -> int:
        return self.context_dim * self.hidden + self.hidden * self.groups * self.entries


@register_source("homogeneous", "sliding", "offset")
class HomogeneousKernel(_Homogeneous):
    """Dynamic depth-wise convolution: one K x K kernel per instance and group. -> (N, G, K*K)."""
    size_bound = False  # computed from the context at whatever size it has

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim, layout.tokens)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        return self.predicted(context)


@register_source("homogeneous", "windowed", "offset")
class HomogeneousWindowOffset(_Homogeneous):
    """Dynamic window convolution: a predicted offset table per instance. -> (N, 1, G, T, T)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim, layout.offsets)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        table = self.predicted(context)
        return table[:, :, layout.relative_index][:, None]


class _Inhomogeneous(WeightSource):
    """Predict, at every position, one weight per group and neighbour (official IDynamicDWConv)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.predict = predictor_head(context_dim, self.hidden, groups * self.neighbours, first_bias=True)

    def macs(self) -> int:
        per_position = self.context_dim * self.hidden + self.hidden * self.groups * self.neighbours
        return self.positions * per_position


@register_source("inhomogeneous", "sliding", "none")
class InhomogeneousSliding(_Inhomogeneous):
    """I-D-DW conv: a K x K kernel per instance, group and position. -> (N, G, K*K, H, W)."""
    size_bound = False  # computed from the context at whatever size it has

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        n, _, h, w = context.shape
        return self.predict(context).reshape(n, self.groups, self.neighbours, h, w)


@register_source("inhomogeneous", "windowed", "none")
class InhomogeneousWindow(_Inhomogeneous):
    """Each position predicts its weights over the positions of its window. -> (N, nW, G, T, T)."""

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        w = layout.partition(self.predict(context))  # (N, nW, G*T_j, T_i)
        n, nw, _, t = w.shape
        return w.reshape(n, nw, self.groups, t, t).transpose(-1, -2)
