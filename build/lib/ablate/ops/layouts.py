"""Layouts: how the positions j that an output position i sees are arranged (sparse connectivity).

A layout owns the geometry of one layer at one feature-map size and applies weights that a weight
source hands it. Two layouts cover the three connectivities:

- `WindowLayout`: non-overlapping windows of T = wh * ww positions, optionally cyclically shifted
  (Swin). Weights are (N|1, nW|1, G, T, T) matrices w[.., i, j] inside each window. `global`
  connectivity is one window covering the whole map.
- `SlidingLayout`: the K x K neighbourhood around every position, zero padded. Weights are either a
  kernel per group (N|1, G, K*K), shared over positions and applied as a convolution, or per position
  (N|1, G, K*K, H, W), applied by shift-and-accumulate (no unfold of the whole map).

Tensors are NCHW. A size-1 leading weight dim means "shared over that dim" and is never expanded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ablate.ops.functional import sliding_aggregate
from ablate.space.spec import Connectivity

__all__ = ["WindowLayout", "SlidingLayout", "build_layout"]


class WindowLayout(nn.Module):
    """Non-overlapping windows over an H x W map (padded to a multiple of the window, like Swin).

    As in Swin, a window larger than the map shrinks to the map and then is not shifted.
    """

    kind = "windowed"
    size_bound = True  # the padding, the windows and the shift masks are those of one map size

    def __init__(self, resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]):
        super().__init__()
        self.resolution = tuple(resolution)
        h, w = self.resolution
        self.window = (min(window[0], h), min(window[1], w))
        self.shift = tuple(0 if r <= k else s for r, k, s in zip(self.resolution, self.window, shift))
        wh, ww = self.window
        self.padded = (h + (-h) % wh, w + (-w) % ww)
        self.grid = (self.padded[0] // wh, self.padded[1] // ww)
        self.num_windows = self.grid[0] * self.grid[1]
        self.tokens = wh * ww
        self.register_buffer("relative_index", relative_offset_index(wh, ww), persistent=False)
        mask = shift_region_mask(self.padded, self.window, self.shift)
        self.register_buffer("same_region", mask, persistent=False)  # (nW, T, T) bool or None

    @property
    def offsets(self) -> int:
        """Number of distinct offsets j - i inside a window: the size of an offset table."""
        return (2 * self.window[0] - 1) * (2 * self.window[1] - 1)

    def partition(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, nW, C, T): pad, roll, cut into windows.

        Padding comes first, as in the official Swin for detection and segmentation: the roll then
        wraps at the padded map's edge, where `shift_region_mask` draws its regions. Rolling first
        (timm's order, pytorch-image-models issue 2438) wraps at the map's own edge, and the mask
        then lets opposite borders of the map attend to each other.
        """
        n, c = t.shape[:2]
        ph, pw = self.padded[0] - self.resolution[0], self.padded[1] - self.resolution[1]
        if ph or pw:
            t = F.pad(t, (0, pw, 0, ph))
        if any(self.shift):
            t = torch.roll(t, shifts=(-self.shift[0], -self.shift[1]), dims=(2, 3))
        (gh, gw), (wh, ww) = self.grid, self.window
        t = t.reshape(n, c, gh, wh, gw, ww).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(n, gh * gw, c, wh * ww)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """(N, nW, C, T) -> (N, C, H, W): the inverse of `partition`."""
        n, _, c, _ = t.shape
        (gh, gw), (wh, ww) = self.grid, self.window
        t = t.reshape(n, gh, gw, c, wh, ww).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * wh, gw * ww)
        if any(self.shift):
            t = torch.roll(t, shifts=self.shift, dims=(2, 3))
        return t[:, :, : self.resolution[0], : self.resolution[1]]

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Attention logits (N, nW, G, T, T): pairs from different shift regions get -inf."""
        if self.same_region is None:
            return logits
        return logits.masked_fill(~self.same_region[:, None], float("-inf"))

    def aggregate(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y[n, g*Cg + c, i] = sum_j w[n, win(i), g, i, j] x[n, g*Cg + c, j] inside each window."""
        n, c = x.shape[:2]
        groups = weights.shape[2]
        if self.same_region is not None:  # a shifted window joins regions that are not neighbours
            weights = weights * self.same_region[:, None].to(weights.dtype)
        xw = self.partition(x).reshape(n, self.num_windows, groups, c // groups, self.tokens)
        # Dims of size 1 in the weights are shared: leave them out of the einsum so that they are
        # never expanded (a static window weight is then one (G, T, T) tensor, not one per image).
        w_dims = ("n" if weights.shape[0] > 1 else "") + ("w" if weights.shape[1] > 1 else "")
        w = weights.reshape(*(s for s, d in zip(weights.shape[:2], "nw") if d in w_dims),
                            *weights.shape[2:])
        y = torch.einsum(f"{w_dims}gij,nwgcj->nwgci", w, xw)
        return self.merge(y.reshape(n, self.num_windows, c, self.tokens))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, window={self.window}, shift={self.shift}"


class SlidingLayout(nn.Module):
    """The K x K neighbourhood around every position; positions outside the map read zeros."""

    kind = "sliding"
    size_bound = False  # the K x K neighbourhood of any map (only its `inside` mask has one size)

    def __init__(self, resolution: tuple[int, int], kernel_size: int):
        super().__init__()
        self.resolution = tuple(resolution)
        self.kernel_size = kernel_size
        self.pad = kernel_size // 2
        self.tokens = kernel_size * kernel_size
        # inside[k, h, w]: neighbour k of position (h, w) lies on the map (not in the zero padding)
        h, w = self.resolution
        offsets = torch.arange(self.tokens)
        dy, dx = offsets // kernel_size - self.pad, offsets % kernel_size - self.pad
        rows = torch.arange(h)[None, :, None] + dy[:, None, None]
        cols = torch.arange(w)[None, None, :] + dx[:, None, None]
        self.register_buffer("inside", (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w), persistent=False)

    def aggregate(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        groups = weights.shape[1]
        if weights.dim() == 3:  # one kernel per group (and per instance): a depth-wise convolution
            kernel = weights.repeat_interleave(c // groups, dim=1)  # (N|1, C, K*K)
            kernel = kernel.reshape(-1, 1, self.kernel_size, self.kernel_size)
            if weights.shape[0] == 1:
                return F.conv2d(x, kernel.to(x.dtype), padding=self.pad, groups=c)
            # per-instance kernels: fold the batch into the channels (the official dynamic DWNet)
            y = F.conv2d(x.reshape(1, n * c, h, w), kernel.to(x.dtype), padding=self.pad, groups=n * c)
            return y.reshape(n, c, h, w)
        # per-position weights (N|1, G, K*K, H, W): shift-and-accumulate over the K*K offsets
        y = sliding_aggregate(x.reshape(n, groups, c // groups, h, w), weights, self.kernel_size)
        return y.reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, kernel_size={self.kernel_size}"


def relative_offset_index(wh: int, ww: int) -> torch.Tensor:
    """(T, T) index of the offset i - j into a (2wh-1)(2ww-1) table, in Swin's (and timm's) order."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shift_region_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]):
    """(nW, T, T) bool: whether i and j of a shifted window come from the same region of the map.

    After a cyclic roll of the padded map, a window at the border holds positions from opposite
    sides of it; as in Swin, they must not see each other. None when there is no shift.
    """
    if not any(shift):
        return None
    region = torch.zeros(padded, dtype=torch.long)
    bounds = [((0, -k), (-k, -s), (-s, None)) for k, s in zip(window, shift)]
    label = 0
    for r0, r1 in bounds[0]:
        for c0, c1 in bounds[1]:
            region[r0:r1, c0:c1] = label
            label += 1
    (wh, ww), (gh, gw) = window, (padded[0] // window[0], padded[1] // window[1])
    region = region.reshape(gh, wh, gw, ww).permute(0, 2, 1, 3).reshape(gh * gw, wh * ww)
    return region[:, :, None] == region[:, None, :]


def build_layout(connectivity: Connectivity, resolution: tuple[int, int]) -> nn.Module:
    """The layout of one layer. `connectivity.shift` here means: this layer is a shifted one."""
    if connectivity.kind == "sliding":
        return SlidingLayout(resolution, connectivity.kernel_size)
    if connectivity.kind == "global":
        return WindowLayout(resolution, resolution, (0, 0))
    k = connectivity.kernel_size
    shift = (k // 2, k // 2) if connectivity.shift else (0, 0)
    return WindowLayout(resolution, (k, k), shift)
