"""What every weight source shares: its size bookkeeping and the predictor of the dynamic options."""
from __future__ import annotations

import math

from torch import nn

from ablate.space.spec import Dynamic

__all__ = ["WeightSource", "predictor_head", "uniform_"]


class WeightSource(nn.Module):
    """Computes the weights w that a layout applies, from the operator's context (or nothing).

    Subclasses say the shape of their weights in their docstring and implement
    `forward(context, layout)` and `macs()` (multiply-accumulates per sample to compute the
    weights, for the GMAC count).

    `size_bound`: the weights (or what computes them) are laid out for the layout's map size, so a map
    of another size must be refused. True unless a source says otherwise: a source that reads
    `layout.resolution` or holds per-position tensors and forgets to say so is then refused, not misread.
    """

    size_bound = True

    def __init__(self, layout: nn.Module, dim: int, groups: int, dynamic: Dynamic, context_dim: int):
        super().__init__()
        self.dim, self.groups, self.context_dim = dim, groups, context_dim
        self.hidden = max(1, context_dim // dynamic.reduction)
        self.positions = layout.resolution[0] * layout.resolution[1]
        self.neighbours = layout.tokens  # how many positions j each output position i sees

    def macs(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"


def predictor_head(context_dim: int, hidden: int, outputs: int, first_bias: bool) -> nn.Sequential:
    """1x1 conv, BN, ReLU, 1x1 conv: the weight predictor of the official (I-)D-DWNet."""
    return nn.Sequential(
        nn.Conv2d(context_dim, hidden, 1, bias=first_bias),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, outputs, 1),
    )


def uniform_(param: nn.Parameter, fan_in: int) -> nn.Parameter:
    """The default init of a convolution with this fan-in, for every static weight layout alike."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(param, -bound, bound)
    return param
