"""The separable RoIAlign (ablate/models/roi_align.py) against torchvision's: the same numbers forward
and backward, in float64, for regions of every kind (at the borders, smaller than a pixel, partly off
the map, images without regions), and the pyramid pooler against torchvision's MultiScaleRoIAlign."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ablate.models.dense import MaskRCNN
from ablate.models.roi_align import RoIAlignPyramid, separable_roi_align
from ablate.models.zoo import create


def _rois(images: int, per_image: int, image_size: int, seed: int = 0, skip: int | None = None):
    """(image index, x0, y0, x1, y1) regions: random ones, plus the kinds torchvision treats apart."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(images):
        if i == skip:
            continue
        corner = torch.rand(per_image, 2, generator=g, dtype=torch.float64) * image_size
        size = torch.rand(per_image, 2, generator=g, dtype=torch.float64) * image_size * 0.7
        boxes = torch.cat([corner, corner + size], 1)
        special = torch.tensor([[0, 0, image_size, image_size],              # the whole image
                                [image_size - 0.3, 2.0, image_size, 2.2],     # under a pixel, at the border
                                [-6.0, -6.0, 5.0, 9.0],                       # partly off the map
                                [image_size - 3, image_size - 3, image_size + 9, image_size + 9]],
                               dtype=torch.float64)
        boxes = torch.cat([boxes, special])
        rows.append(torch.cat([torch.full((len(boxes), 1), float(i), dtype=torch.float64), boxes], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("out,ratio,scale", [(7, 2, 0.5), (14, 2, 0.25), (3, 1, 1.0), (5, 3, 0.125)])
def test_separable_roi_align_is_torchvisions_forward_and_backward(out, ratio, scale):
    features = torch.randn(3, 4, 11, 13, dtype=torch.float64, requires_grad=True)
    rois = _rois(3, 20, int(13 / scale), skip=1)
    ours = separable_roi_align(features, rois, out, scale, ratio)
    theirs = roi_align(features, rois, (out, out), spatial_scale=scale, sampling_ratio=ratio)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(theirs)
    ours_grad, = torch.autograd.grad(ours, features, grad)
    theirs_grad, = torch.autograd.grad(theirs, features, grad)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


def test_separable_roi_align_passes_gradcheck():
    features = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    rois = _rois(2, 3, 10)
    assert torch.autograd.gradcheck(lambda f: separable_roi_align(f, rois, 3, 0.5, 2), (features,))


def test_separable_roi_align_without_regions_keeps_the_graph():
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    pooled = separable_roi_align(features, torch.zeros(0, 5), 7, 0.5, 2)
    assert pooled.shape == (0, 3, 7, 7) and pooled.requires_grad
    with pytest.raises(ValueError, match="sampling_ratio"):
        separable_roi_align(features, _rois(2, 2, 16).float(), 7, 0.5, 0)


@pytest.mark.parametrize("ratio", [2, 0])
def test_the_pyramid_pooler_is_torchvisions(ratio):
    """Four levels (strides 4 to 32 of a 256 px image) and regions of every size, so that every level
    gets regions: the separable form on the small maps, torchvision's kernel on the 64 x 64 one (its
    cost over the limit) and everywhere with adaptive sampling (ratio 0)."""
    torch.manual_seed(0)
    maps = OrderedDict((str(i), torch.randn(2, 3, 64 >> i, 64 >> i, dtype=torch.float64, requires_grad=True))
                       for i in range(4))
    rois = _rois(2, 40, 256, seed=1)
    boxes = [rois[rois[:, 0] == i, 1:].clamp(0, 256) for i in range(2)]
    boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]
    # a smaller canonical scale than ImageNet's 224, so that regions of a 256 px image reach level 4
    ours = RoIAlignPyramid(list(maps), 7, ratio, canonical_scale=64)
    theirs = MultiScaleRoIAlign(list(maps), 7, ratio, canonical_scale=64)
    shapes = [(256, 256)] * 2
    separable = [ours._separable(m, 7) for m in maps.values()]
    assert separable == ([False, True, True, True] if ratio else [False] * 4)
    mine, expected = ours(maps, boxes, shapes), theirs(maps, boxes, shapes)
    assert len(set(theirs.map_levels(boxes).tolist())) == 4  # every level pools some regions
    torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(mine, list(maps.values()), grad),
                    torch.autograd.grad(expected, list(maps.values()), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mask_rcnn_pools_with_the_pyramid_pooler():
    net = create("dwconv", "micro", num_classes=0, img_size=(64, 64))
    model = MaskRCNN(net, 11, fpn_channels=16, representation_size=32, mask_channels=16, mask_layers=1,
                     anchor_sizes=(8, 16, 32, 64, 128))
    assert isinstance(model.roi_heads.box_roi_pool, RoIAlignPyramid)
    assert isinstance(model.roi_heads.mask_roi_pool, RoIAlignPyramid)
    pools = model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool
    assert [(p.output_size, p.sampling_ratio) for p in pools] == [((7, 7), 2), ((14, 14), 2)]


def test_the_flop_count_is_the_models_not_the_pooling_implementations():
    """The separable form's matrix products are not the model's: its GMAC is counted with torchvision's
    kernel (which the formulas leave out, as the paper's counter does), the same before and after."""
    net = create("dwconv", "micro", num_classes=0, img_size=(64, 64))
    model = MaskRCNN(net, 11, fpn_channels=16, representation_size=32, mask_channels=16, mask_layers=1,
                     anchor_sizes=(8, 16, 32, 64, 128))
    counted = model.macs()
    pools = model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool
    assert all(p.separable for p in pools)  # counting left the poolers as they were
    for pool in pools:
        pool.separable = False
    assert model.macs() == counted
