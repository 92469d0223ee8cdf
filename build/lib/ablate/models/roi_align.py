"""RoIAlign as two matrix products, for Mask R-CNN on a CPU.

torchvision's RoIAlign samples each bin of a region bilinearly; its CPU backward scatters every sample's
four weights into the feature map one at a time, on one thread, and took 40% of a micro detection step
(`make downstream`'s detector on the garment scenes). The sampling is separable: a region's pooled map
is Ay @ F @ Ax^T, where Ax (out x W) holds, per output column, the mean over its samples of the 1D
bilinear weights along x (two non-zeros a sample), and Ay likewise along y. So the forward and both
backward passes are dense matrix products (BLAS, every core), exactly torchvision's numbers
(`aligned=False`, a fixed `sampling_ratio`: its placement of samples, its clamping at the borders).

The products touch the whole map for every region (H*W*out multiply-adds a channel, against
torchvision's out^2*ratio^2*4), so they win only on small maps. Measured on 2 cores, 16 images x 128
regions x 64 channels, forward and backward (`python -m ablate.models.roi_align` times both): 2-6x
faster where H*W <= 100*out*ratio^2 (micro's 32 x 32 level and smaller), even at about 150; a micro
detection step 1.42x faster. Larger maps, adaptive sampling and GPUs keep torchvision's kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales

__all__ = ["separable_roi_align", "RoIAlignPyramid", "SEPARABLE_MAX_COST"]

# the largest H*W / (out * ratio^2) at which the separable form is used (measured break-even: ~150)
SEPARABLE_MAX_COST = 100


def _axis_weights(start: Tensor, length: Tensor, size: int, out: int, ratio: int) -> Tensor:
    """(regions, out, size): per output bin, the mean over its `ratio` samples of the bilinear weights
    along one axis, the samples placed and clamped as torchvision's roi_align places them (a sample
    more than one pixel outside the map counts zero; one within a pixel of the border reads the border)."""
    samples = out * ratio
    offsets = (torch.arange(samples, dtype=start.dtype, device=start.device) + 0.5) / samples
    pos = start[:, None] + offsets * length[:, None]
    inside = ((pos >= -1.0) & (pos <= size)).to(start.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low, pos)
    frac = pos - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = start.new_zeros(len(start), samples, size)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(len(start), out, ratio, size).mean(2)


def separable_roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                        sampling_ratio: int) -> Tensor:
    """torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=False) for a fixed sampling_ratio > 0, by matrix products: features (N, C, H, W), rois
    (R, 5) as (image index, x0, y0, x1, y1) in image coordinates; returns (R, C, out, out)."""
    if sampling_ratio <= 0:
        raise ValueError(f"the separable RoIAlign needs a fixed sampling_ratio > 0; got {sampling_ratio}")
    n, channels, height, width = features.shape
    out = output_size
    pooled = features.new_zeros(len(rois), channels, out, out)
    if not len(rois):
        return pooled + features.sum() * 0  # keeps the graph (and DDP's view of the parameters) whole
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale
    sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)  # as roi_align: a region at least one pixel
    along_x = _axis_weights(boxes[:, 0], sizes[:, 0], width, out, sampling_ratio)  # R, out, W
    along_y = _axis_weights(boxes[:, 1], sizes[:, 1], height, out, sampling_ratio)  # R, out, H
    image = rois[:, 0].long()
    parts, order = [], []
    for b in range(n):
        mine = (image == b).nonzero().squeeze(1)
        if not len(mine):
            continue
        r = len(mine)
        # F (C*H, W) @ Ax^T (W, r*out): every region's columns at once, then each region's rows
        cols = features[b].reshape(channels * height, width) @ along_x[mine].reshape(r * out, width).t()
        cols = cols.view(channels, height, r, out).permute(2, 0, 1, 3)  # r, C, H, out
        parts.append(along_y[mine][:, None] @ cols)  # r, C, out(y), out(x)
        order.append(mine)
    return pooled.index_copy(0, torch.cat(order), torch.cat(parts))


class RoIAlignPyramid(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (the same levels, scales and numbers) whose pooling is
    `separable_roi_align` on a CPU where a level's map is small enough to gain by it
    (SEPARABLE_MAX_COST), torchvision's roi_align elsewhere, or everywhere with `separable = False`
    (the FLOP count: the model's, not this implementation's matrix products)."""

    separable = True

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        out = self.output_size[0]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(maps) > 1:
            levels = self.map_levels(boxes)
        else:
            levels = torch.zeros(len(rois), dtype=torch.long, device=rois.device)
        pooled = maps[0].new_zeros(len(rois), maps[0].shape[1], out, out)
        for level, (features, scale) in enumerate(zip(maps, self.scales)):
            mine = torch.where(levels == level)[0]
            pool = separable_roi_align if self._separable(features, out) else self._torchvision
            pooled[mine] = pool(features, rois[mine], out, scale, self.sampling_ratio).to(pooled.dtype)
        return pooled

    def _separable(self, features: Tensor, out: int) -> bool:
        if not self.separable or features.device.type != "cpu" or self.sampling_ratio <= 0:
            return False
        cost = features.shape[-2] * features.shape[-1] / (out * self.sampling_ratio ** 2)
        return cost <= SEPARABLE_MAX_COST

    @staticmethod
    def _torchvision(features, rois, out, scale, ratio):
        return roi_align(features, rois, (out, out), spatial_scale=scale, sampling_ratio=ratio)


def main() -> None:
    """Times torchvision's roi_align and the separable form, forward and backward, side by side."""
    import time

    def timed(pool, features, rois, out, grad):
        for _ in range(2):
            pool(features, rois, out, 0.5, 2).backward(grad)
        start = time.perf_counter()
        for _ in range(5):
            pool(features, rois, out, 0.5, 2).backward(grad)
        return (time.perf_counter() - start) / 5

    torch.manual_seed(0)
    print("map      out  cost  torchvision ms  separable ms  speed-up")
    for side in (16, 32, 64):
        features = torch.randn(16, 64, side, side, requires_grad=True)
        corner = torch.rand(16 * 128, 2) * (2 * side - 14)
        far = (corner + torch.rand(16 * 128, 2) * 1.2 * side + 2).clamp(max=2 * side)
        boxes = torch.cat([corner, far], 1)
        rois = torch.cat([torch.arange(16).repeat_interleave(128)[:, None].float(), boxes], 1)
        for out in (7, 14):
            grad = torch.randn(len(rois), 64, out, out)
            tv = timed(RoIAlignPyramid._torchvision, features, rois, out, grad)
            sep = timed(separable_roi_align, features, rois, out, grad)
            print(f"{side:>2} x {side:<3} {out:>3} {side * side / (out * 4):5.0f} {tv * 1e3:15.1f} "
                  f"{sep * 1e3:13.1f} {tv / sep:9.2f}")


if __name__ == "__main__":
    main()
