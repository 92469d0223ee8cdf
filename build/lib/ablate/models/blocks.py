"""Block styles: where the operator sits. A config group (`conf/block/`), so holding the block fixed
while only the operator changes is one override.

swin:  x + out_proj(op(in_proj(LN(x)), context=LN(x))), then x + MLP(LN(x)). The operator's weights
       are computed from LN(x), as Swin's q and k; in_proj plays Swin's v, out_proj its proj.
       The block hands in_proj to the operator (`op(LN(x), value_proj=in_proj)`), so that a fast
       path can compute v, q and k with one GEMM, as Swin's qkv.
dwnet: the official DWNet block: 1x1 conv-BN-ReLU, operator, BN-ReLU, 1x1 conv-BN, then
       x + MLP(BN(x)). The operator's weights are computed from its own input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import nn

from ablate.ops.fast import routes
from ablate.ops.mixer import SpatialMixer

__all__ = ["SwinBlock", "DWNetBlock", "BLOCKS", "Mlp", "Pointwise", "pointwise", "LN_EPS", "POINTWISE"]

# Swin uses nn.LayerNorm with its default eps; timm's LayerNorm2d defaults to 1e-6 (ConvNeXt).
LN_EPS = 1e-5

POINTWISE = "pointwise"
# The same GEMM two ways on a channels_last map: cuDNN's 1x1 convolution, or a linear layer on the
# map's rows (positions x channels, a view of it), as timm's Swin computes its projections and MLP
# (cuBLAS). Which is faster depends on the GPU, the library versions and the shape; the route times it.
routes.register(POINTWISE, {
    "cudnn conv": lambda layout, x, weight, bias: F.conv2d(x, weight, bias),
    "linear on rows": lambda layout, x, weight, bias: F.linear(
        x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2),
})


class Pointwise(nn.Conv2d):
    """A 1x1 convolution: the nn.Linear of Swin's blocks on a map (its weights, its function). On a
    GPU a channels_last map goes through the route's choice of cuDNN's convolution or the linear
    layer's GEMM on the map's rows; elsewhere the convolution (oneDNN's, on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if routes.routed(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return routes.run(POINTWISE, None, x, self.weight, self.bias)
        return super().forward(x)


def pointwise(in_dim: int, out_dim: int, bias: bool = True, linear_init: bool = True) -> Pointwise:
    """A 1x1 convolution; with `linear_init`, initialised as the nn.Linear it replaces in Swin."""
    conv = Pointwise(in_dim, out_dim, 1, bias=bias)
    if linear_init:
        nn.init.trunc_normal_(conv.weight, std=0.02)
        if bias:
            nn.init.zeros_(conv.bias)
    return conv


class Mlp(nn.Sequential):
    """The channel MLP of both styles: 1x1 conv, GELU, 1x1 conv."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(pointwise(dim, hidden), nn.GELU(), pointwise(hidden, dim))

    def macs(self, positions: int) -> int:
        return 2 * positions * self[0].in_channels * self[0].out_channels


class SwinBlock(nn.Module):
    def __init__(self, mixer: SpatialMixer, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        dim = mixer.dim
        self.norm1 = LayerNorm2d(dim, eps=LN_EPS)
        self.in_proj = pointwise(dim, dim)
        self.mixer = mixer
        self.out_proj = pointwise(dim, dim)
        self.norm2 = LayerNorm2d(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        u = self.norm1(x)
        x = x + self.drop_path(self.out_proj(self.mixer(u, value_proj=self.in_proj)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def macs(self) -> int:
        h, w = self.mixer.layout.resolution
        d = self.mixer.dim
        return 2 * h * w * d * d + self.mixer.macs() + self.mlp.macs(h * w)


class DWNetBlock(nn.Module):
    def __init__(self, mixer: SpatialMixer, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        dim = mixer.dim
        self.conv0 = pointwise(dim, dim, bias=False, linear_init=False)
        self.bn0 = nn.BatchNorm2d(dim)
        self.mixer = mixer
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = pointwise(dim, dim, bias=False, linear_init=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.act = nn.ReLU(inplace=True)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.act(self.bn0(self.conv0(x)))
        y = self.act(self.bn1(self.mixer(y)))
        x = x + self.drop_path(self.bn2(self.conv2(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def macs(self) -> int:
        h, w = self.mixer.layout.resolution
        d = self.mixer.dim
        return 2 * h * w * d * d + self.mixer.macs() + self.mlp.macs(h * w)


BLOCKS = {"swin": SwinBlock, "dwnet": DWNetBlock}
