"""The macro architecture of Swin, with any operator of the space in its blocks.

Patch embedding, four stages (patch merging between them), stochastic depth, a pooled linear head.
NCHW throughout, so `features_only=True` hands detection and segmentation necks the NCHW maps they
expect; on a GPU, channels_last memory format makes the 1x1 convolutions plain GEMMs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from ablate.models.blocks import BLOCKS, LN_EPS, pointwise
from ablate.ops.mixer import SpatialMixer
from ablate.space.rules import InvalidOperatorError, validate
from ablate.space.spec import OperatorSpec

__all__ = ["ModelSize", "SIZES", "AblateNet", "stage_geometry"]


@dataclass(frozen=True)
class ModelSize:
    embed_dim: int
    depths: tuple[int, ...]
    patch_size: int
    img_size: int
    drop_path_rate: float
    mlp_ratio: float = 4.0
    window: int = 7  # window / kernel size of the operators (Swin, DWNet: 7 at 224 px)


# micro: for 28-32 px images on a CPU, with Swin-T's geometry scaled down (docs/DESIGN.md, "Model
# sizes"): patch 2 gives maps of 14, 7, 4, 2 at 28 px; window 3 leaves 5 and 3 windows per side in the
# first two stages (Swin-T: 8 and 4), two blocks per stage shift every second window there, and 6 of
# the 8 mixing layers are local (Swin-T: 10 of 12). MLP ratio 2.
SIZES: dict[str, ModelSize] = {
    "micro": ModelSize(32, (2, 2, 2, 2), 2, 28, 0.0, mlp_ratio=2.0, window=3),
    "tiny": ModelSize(96, (2, 2, 6, 2), 4, 224, 0.2),
    "small": ModelSize(96, (2, 2, 18, 2), 4, 224, 0.3),
    "base": ModelSize(128, (2, 2, 18, 2), 4, 224, 0.5),
}


def stage_geometry(img_size: Sequence[int], patch_size: int, embed_dim: int, stages: int):
    """Widths and feature-map sizes of the stages (merging pads odd sizes, as timm's Swin)."""
    h, w = img_size
    if h % patch_size or w % patch_size:
        raise InvalidOperatorError(
            "img_size must be a multiple of patch_size",
            f"img_size={tuple(img_size)} is not divisible by patch_size={patch_size}.",
            [f"img_size={(h // patch_size) * patch_size}", f"img_size={-(-h // patch_size) * patch_size}"])
    h, w = h // patch_size, w // patch_size
    widths, sizes = [], []
    for s in range(stages):
        widths.append(embed_dim * 2 ** s)
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return widths, sizes


def _pool(global_pool: str, num_classes: int) -> str:
    """timm's global_pool values that this head has: any other left the map unpooled, and the
    classifier then failed on its shape."""
    if global_pool not in ("avg", "max", "") or (global_pool == "" and num_classes > 0):
        raise ValueError(f"global_pool={global_pool!r}: AblateNet pools with 'avg' or 'max', or returns "
                         "the unpooled map with '' when num_classes=0")
    return global_pool


class PatchMerging(nn.Module):
    """2x2 space-to-depth, LayerNorm, linear 4C -> 2C (Swin's order of the four neighbours)."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.dim, self.resolution = dim, resolution
        self.norm = LayerNorm2d(4 * dim, eps=LN_EPS)
        self.reduction = pointwise(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.reduction(self.norm(x))

    def macs(self) -> int:
        h, w = -(-self.resolution[0] // 2), -(-self.resolution[1] // 2)
        return h * w * 4 * self.dim * 2 * self.dim


class Stage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.downsample(x))


class AblateNet(nn.Module):
    """A Swin-style backbone whose spatial mixing is `spec` in every block.

    Args:
        spec: the operator (a point of the operator space).
        block: block style, "swin" or "dwnet".
        embed_dim, depths, patch_size, mlp_ratio: the macro architecture (see SIZES).
        img_size: input size; fixed, since some operators have a weight per position.
        in_chans, num_classes, drop_rate, drop_path_rate: as in timm.
    """

    def __init__(
        self,
        spec: OperatorSpec,
        block: str = "swin",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
    ):
        super().__init__()
        if block not in BLOCKS:
            raise InvalidOperatorError("block", f"unknown block style {block!r}.",
                                       [f"block={b}" for b in BLOCKS])
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        widths, sizes = stage_geometry(img_size, patch_size, embed_dim, len(depths))
        channels_per_group = validate(spec, widths, sizes, whole_model=True)
        self.spec, self.block, self.img_size = spec, block, img_size
        self.stage_channels_per_group = channels_per_group
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.global_pool = _pool(global_pool, num_classes)
        self.num_features = self.head_hidden_size = widths[-1]
        self.patch_size, self.in_chans = patch_size, in_chans

        self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size),
                                  LayerNorm2d(embed_dim, eps=LN_EPS))
        n = sum(depths)  # stochastic depth grows linearly with depth (Swin); plain floats, so that
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # a meta-device build works
        stages, self.feature_info = [], []
        for s, (depth, dim, size, cpg) in enumerate(zip(depths, widths, sizes, channels_per_group)):
            blocks = []
            for b in range(depth):
                mixer = SpatialMixer(spec, dim, size, cpg, shifted=b % 2 == 1)
                blocks.append(BLOCKS[block](mixer, mlp_ratio, rates.pop(0)))
            down = PatchMerging(widths[s - 1], sizes[s - 1]) if s else nn.Identity()
            stages.append(Stage(down, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** s, module=f"stages.{s}"))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features, eps=LN_EPS)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # -- timm model interface -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables take no weight decay (as Swin's relative position bias)."""
        return {name for name, _ in self.named_parameters() if name.endswith("position_bias")}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.global_pool = _pool(self.global_pool if global_pool is None else global_pool, num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.global_pool == "max":
            x = x.amax(dim=(2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- accounting -----------------------------------------------------------------------------
    def mixers(self) -> list[SpatialMixer]:
        return [m for m in self.modules() if isinstance(m, SpatialMixer)]

    def macs(self) -> int:
        """Analytic multiply-accumulates per image (norms and activations not counted)."""
        h, w = self.img_size
        p = self.patch_size
        total = (h // p) * (w // p) * self.stem[0].out_channels * self.in_chans * p * p
        for stage in self.stages:
            if isinstance(stage.downsample, PatchMerging):
                total += stage.downsample.macs()
            total += sum(b.macs() for b in stage.blocks)
        if isinstance(self.head, nn.Linear):
            total += self.head.in_features * self.head.out_features
        return total
