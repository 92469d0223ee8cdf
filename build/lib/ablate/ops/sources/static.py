"""`dynamic: static`: the weights are learned parameters, the same for every input.

One class per spatial sharing and layout; each returns weights with size-1 leading dims (shared
over instances, and over windows where the sharing says so), which the layout never expands.
"""
from __future__ import annotations

import torch
from torch import nn

from ablate.ops.registry import register_source
from ablate.ops.sources.base import WeightSource, uniform_


@register_source("static", "windowed", "offset")
class StaticWindowOffset(WeightSource):
    """A window convolution: w[g, i, j] = table[g, i - j] inside each window. -> (1, 1, G, T, T)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.table = uniform_(nn.Parameter(torch.empty(groups, layout.offsets)), layout.tokens)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        index = layout.relative_index
        return self.table[:, index][None, None]


@register_source("static", "windowed", "window")
class StaticWindowShared(WeightSource):
    """A local MLP: position-specific inside a window, shared across windows. -> (1, 1, G, T, T)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        t = layout.tokens
        self.weight = uniform_(nn.Parameter(torch.empty(groups, t, t)), t)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        return self.weight[None, None]


@register_source("static", "windowed", "none")
class StaticPerWindow(WeightSource):
    """Locally connected inside windows: every window its own weights. -> (1, nW, G, T, T)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        t = layout.tokens
        self.weight = uniform_(nn.Parameter(torch.empty(layout.num_windows, groups, t, t)), t)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        return self.weight[None]


@register_source("static", "sliding", "offset")
class StaticKernel(WeightSource):
    """A (grouped) depth-wise convolution kernel. -> (1, G, K*K)."""
    size_bound = False  # one kernel slides over any map

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.weight = uniform_(nn.Parameter(torch.empty(groups, layout.tokens)), layout.tokens)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        return self.weight[None]


@register_source("static", "sliding", "none")
class StaticLocallyConnected(WeightSource):
    """The locally connected layer: a K x K kernel per position. -> (1, G, K*K, H, W)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        h, w = layout.resolution
        self.weight = uniform_(nn.Parameter(torch.empty(groups, layout.tokens, h, w)), layout.tokens)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        return self.weight[None]
