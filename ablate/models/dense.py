"""The paper's other two tasks on ablate's backbones: Mask R-CNN (detection, instance masks) and UPerNet.

Both read the four stage maps of an AblateNet (NCHW, strides patch x 1, 2, 4, 8), each through a
LayerNorm of its own as Swin's detection backbone does:

- `MaskRCNN`: torchvision's Mask R-CNN on a feature pyramid (FPN, plus a max-pooled fifth level) over
  the stages. The paper uses Cascade Mask R-CNN (mmdetection); torchvision has no cascade head, and
  Mask R-CNN is the closest it gives: the same backbone, FPN, RPN, RoIAlign and mask head, with one
  box head instead of three refining ones (Swin's paper reports Swin-T with both: 46.0 box AP with
  Mask R-CNN 3x, 50.5 with the cascade). Its RoIAlign runs as two matrix products on a CPU where the
  maps are small (ablate/models/roi_align.py: the same numbers, a backward no longer serial).
  torchvision resizes and pads its inputs itself; here every image already has the backbone's one
  input size (ablate/data/dense.py letterboxes them), so its transform neither resizes nor
  normalises (the loader normalised).
- `UPerNet`: the head of Xiao et al. (2018) as the paper uses it (mmsegmentation's UPerHead): a
  pyramid pooling module on the last stage, a top-down feature pyramid, every level upsampled to the
  first and fused, a 1x1 classifier; the logits upsampled to the input. An auxiliary FCN head on the
  third stage (loss weight 0.4 in the paper's recipe) helps training.

`macs()` of each model is the backbone's analytic count plus the heads' count by PyTorch's FLOP
counter (ablate.models.dense_macs); parameters are counted as they are.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ablate.errors import BadInput, at_least
from ablate.models.backbone import AblateNet
from ablate.models.blocks import LN_EPS
from ablate.models.roi_align import RoIAlignPyramid

__all__ = ["CLASSIFIER_PARTS", "StageFeatures", "MaskRCNN", "UPerNet", "dense_macs", "head_settings",
           "HEAD_DEFAULTS", "DETECTION_HEAD", "SEGMENTATION_HEAD"]

# The heads' settings where conf/head/*.yaml leaves them null: the papers' (torchvision's Mask R-CNN,
# mmsegmentation's UPerNet for Swin-T), and at `micro` narrower heads in proportion to its stages
# (32-256 channels against tiny's 96-768) with anchors of 4x the stride for its 16-40 px garments.
DETECTION_HEAD = dict(fpn_channels=256, representation_size=1024, mask_channels=256, mask_layers=4,
                      anchor_sizes=(32, 64, 128, 256, 512), rpn_batch=256, roi_batch=512, detections=100,
                      proposals=2000, proposals_test=1000)
SEGMENTATION_HEAD = dict(channels=512, pool_scales=(1, 2, 3, 6), aux_channels=256, dropout=0.1,
                         aux_weight=0.4)
HEAD_DEFAULTS = {
    "mask_rcnn": {"micro": {**DETECTION_HEAD, "fpn_channels": 64, "representation_size": 256,
                            "mask_channels": 64, "mask_layers": 2, "anchor_sizes": (8, 16, 32, 64, 128),
                            "rpn_batch": 128, "roi_batch": 128, "detections": 20, "proposals": 200,
                            "proposals_test": 100},
                  "default": DETECTION_HEAD},
    "upernet": {"micro": {**SEGMENTATION_HEAD, "channels": 64, "aux_channels": 32},
                "default": SEGMENTATION_HEAD},
}


def head_settings(name: str, size: str, given: dict) -> dict:
    """The head's settings: `given` (null entries left out) over the size's defaults. ValueError
    naming a key the head does not have."""
    if name not in HEAD_DEFAULTS:
        raise ValueError(f"head.name={name!r} is not a head; the heads: {', '.join(HEAD_DEFAULTS)}")
    defaults = HEAD_DEFAULTS[name].get(size, HEAD_DEFAULTS[name]["default"])
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"head.{unknown[0]} is not a setting of {name}; its settings: {', '.join(defaults)}")
    chosen = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in chosen.items()}


# the parts of a classification network's state that its dense backbone has not: the final norm and
# the classifier (a pretraining checkpoint's keys with these prefixes are not loaded)
CLASSIFIER_PARTS = ("norm.", "head.")


class StageFeatures(nn.Module):
    """The four stage maps of an AblateNet, each normed (Swin's detection backbone), as a list."""

    def __init__(self, net: AblateNet):
        super().__init__()
        # the classifier's final norm reads the last map only and feeds nothing here (each stage has
        # its own norm): kept, it would be a parameter without a gradient (counted in the params,
        # refused by DDP)
        net.norm = nn.Identity()
        self.net = net
        self.channels = [info["num_chs"] for info in net.feature_info]
        self.strides = [info["reduction"] for info in net.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=LN_EPS) for c in self.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.net.stem(x)
        maps = []
        for stage, norm in zip(self.net.stages, self.norms):
            x = stage(x)
            maps.append(norm(x))
        return maps

    def macs(self) -> int:
        """The backbone's analytic count (AblateNet.macs without its classifier)."""
        total = self.net.macs()
        if isinstance(self.net.head, nn.Linear):
            total -= self.net.head.in_features * self.net.head.out_features
        return total


class _FlopCount(TorchDispatchMode):
    """FLOPs of the aten ops run inside, by PyTorch's own formulas (torch.utils.flop_counter's
    registry), without its per-module tracker: that one fails on modules that return a parameter."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def dense_macs(model: nn.Module, features: StageFeatures, size: Sequence[int] | None = None) -> int:
    """Multiply-accumulates of one inference forward of a detector or segmenter: the backbone's
    analytic count plus what PyTorch's FLOP formulas find in the rest (necks, heads; the detector's
    proposals as it makes them), at the backbone's input size. The formulas miss some of the
    operators' kernels, which is why the backbone is counted analytically (docs/DESIGN.md). RoIAlign
    pools through torchvision's kernel here, which the formulas leave out as the paper's counter
    (mmcv's) does: its separable CPU form would add matrix products the model does not have."""
    net = features.net
    h, w = net.img_size if size is None else size
    parameter = next(model.parameters())
    x = torch.zeros(1, net.in_chans, h, w, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    poolers = [m for m in model.modules() if isinstance(m, RoIAlignPyramid)]
    model.eval()
    for pooler in poolers:
        pooler.separable = False
    try:
        with torch.no_grad():
            with _FlopCount() as whole:
                model(x)
            with _FlopCount() as backbone:
                features(x)
    finally:
        model.train(was_training)
        for pooler in poolers:
            del pooler.separable  # the class's default again
    return features.macs() + (whole.flops - backbone.flops) // 2


class _FPNBackbone(nn.Module):
    """torchvision's backbone protocol: `out_channels`, and an OrderedDict of pyramid levels."""

    def __init__(self, features: StageFeatures, out_channels: int):
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


class _SizedTransform(GeneralizedRCNNTransform):
    """Images arrive at the one input size the backbone is built for, normalised: keep them so."""

    def __init__(self, size: tuple[int, int]):
        super().__init__(min_size=min(size), max_size=max(size), image_mean=[0.0], image_std=[1.0],
                         size_divisible=1)
        self.size = tuple(size)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image, target=None):
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(f"an image of {tuple(image.shape[-2:])} reached a detector built for "
                             f"{self.size}: letterbox the data to the backbone's input size")
        return image, target


class MaskRCNN(TorchvisionMaskRCNN):
    """Mask R-CNN with an AblateNet backbone; `num_classes` counts the background (classes + 1)."""

    def __init__(self, net: AblateNet, num_classes: int, fpn_channels: int = 256,
                 representation_size: int = 1024, mask_channels: int = 256, mask_layers: int = 4,
                 anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), rpn_batch: int = 256,
                 roi_batch: int = 512, detections: int = 100, proposals: int = 2000,
                 proposals_test: int = 1000):
        features = StageFeatures(net)
        backbone = _FPNBackbone(features, fpn_channels)
        if len(anchor_sizes) != len(features.channels) + 1:
            raise ValueError(f"head.anchor_sizes needs {len(features.channels) + 1} sizes (one per pyramid "
                             f"level: the {len(features.channels)} stages and the pooled one); got "
                             f"{list(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        size = tuple(net.img_size)
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * mask_layers, 1)
        # torchvision's poolers (the stage levels, 7 x 7 and 14 x 14 bins of 2 x 2 samples), with its CPU
        # RoIAlign replaced on small maps by the equal, faster separable form (ablate/models/roi_align.py)
        levels = [str(i) for i in range(len(features.channels))]
        super().__init__(
            backbone, num_classes=None, rpn_anchor_generator=anchors, box_head=box_head,
            box_roi_pool=RoIAlignPyramid(levels, 7, 2), mask_roi_pool=RoIAlignPyramid(levels, 14, 2),
            box_predictor=_box_predictor(representation_size, num_classes), mask_head=mask_head,
            mask_predictor=_mask_predictor(mask_channels, num_classes),
            rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=roi_batch,
            box_detections_per_img=detections, min_size=min(size), max_size=max(size),
            # the RPN's proposals kept per image after NMS (and the twice as many scored before it)
            rpn_pre_nms_top_n_train=min(2 * proposals, 2000),
            rpn_post_nms_top_n_train=proposals, rpn_pre_nms_top_n_test=proposals_test,
            rpn_post_nms_top_n_test=proposals_test)
        self.transform = _SizedTransform(size)
        self.features = features

    @property
    def stage_channels_per_group(self) -> list[int]:
        return self.features.net.stage_channels_per_group

    def macs(self) -> int:
        return dense_macs(self, self.features)


def _box_predictor(representation_size: int, num_classes: int) -> FastRCNNPredictor:
    return FastRCNNPredictor(representation_size, num_classes)


def _mask_predictor(mask_channels: int, num_classes: int) -> MaskRCNNPredictor:
    return MaskRCNNPredictor(mask_channels, mask_channels, num_classes)


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UPerNet(nn.Module):
    """UPerNet on an AblateNet: logits (N, classes, H, W) at the input's size; in training also the
    auxiliary head's logits (returned as a pair)."""

    def __init__(self, net: AblateNet, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_channels: int = 256, dropout: float = 0.1,
                 aux_weight: float = 0.4):
        super().__init__()
        self.aux_weight = aux_weight  # the auxiliary head's share of the loss (the task reads it)
        self.features = StageFeatures(net)
        widths = self.features.channels
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(widths[-1], channels, 1))
            for s in self.pool_scales)
        self.bottleneck = _conv_bn_relu(widths[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in widths[:-1])
        self.fpn = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in widths[:-1])
        self.fuse = _conv_bn_relu(len(widths) * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux = nn.Sequential(_conv_bn_relu(widths[2], aux_channels, 3), nn.Dropout2d(dropout),
                                 nn.Conv2d(aux_channels, num_classes, 1))

    @property
    def stage_channels_per_group(self) -> list[int]:
        return self.features.net.stage_channels_per_group

    def macs(self) -> int:
        return dense_macs(self, self.features)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        maps = self.features(x)
        top = maps[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False)
                  for p in self.ppm]
        levels = [lateral(m) for lateral, m in zip(self.lateral, maps[:-1])]
        levels.append(self.bottleneck(torch.cat([top, *pooled], 1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:],
                                                          mode="bilinear", align_corners=False)
        outs = [conv(level) for conv, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        first = outs[0].shape[-2:]
        upsampled = [F.interpolate(o, size=first, mode="bilinear", align_corners=False) for o in outs[1:]]
        fused = self.fuse(torch.cat([outs[0], *upsampled], 1))
        logits = F.interpolate(self.classifier(fused), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        aux = F.interpolate(self.aux(maps[2]), size=size, mode="bilinear", align_corners=False)
        return logits, aux


def main(argv: list[str] | None = None) -> int:
    """`python -m ablate.models.dense`: params and GMAC of a whole detector or segmenter at an input size
    (by default the size the papers' tables count at: 1280 x 800 for COCO, 2048 x 512 for ADE20K,
    whose models train on 512 x 512 crops)."""
    import argparse

    from ablate.models.backbone import SIZES
    from ablate.models.zoo import create
    from ablate.space.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m ablate.models.dense",
                                description=main.__doc__.splitlines()[0])
    p.add_argument("--task", choices=["detection", "segmentation"], default="detection")
    # choices: a misspelt name is refused in a line (exit 2), not a KeyError from the zoo
    p.add_argument("--operator", choices=list(PRESETS), default="dwconv")
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--input", nargs=2, type=at_least(1, "a side in pixels"), metavar=("H", "W"),
                   help="default: 800 1280 (detection), 512 2048 (segmentation)")
    p.add_argument("--classes", type=at_least(1, "a number of classes"),
                   help="default: 80 (COCO), 150 (ADE20K)")
    a = p.parse_args(argv)
    detection = a.task == "detection"
    hw = tuple(a.input or ((800, 1280) if detection else (512, 2048)))
    classes = a.classes or (80 if detection else 150)
    try:
        net = create(a.operator, a.size, num_classes=0, img_size=hw)
    except (BadInput, ValueError) as err:  # an input size the operator refuses: a line, exit 2 (argparse's)
        p.error(str(err))
    head = head_settings("mask_rcnn" if detection else "upernet", a.size, {})
    model = MaskRCNN(net, classes + 1, **head) if detection else UPerNet(net, classes, **head)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{a.operator} {a.size} {'Mask R-CNN' if detection else 'UPerNet'} at {hw[0]} x {hw[1]}: "
          f"{params:.2f}M params, {model.macs() / 1e9:.1f} GMAC (backbone {model.features.macs() / 1e9:.1f})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
