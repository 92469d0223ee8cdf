"""Shift-and-accumulate over a K x K neighbourhood, with hand-written gradients.

Two primitives cover every per-position sliding operator (locally connected, inhomogeneous dynamic,
neighbourhood attention):

    aggregate(x, w)[n, g, c, i] = sum_k w[n, g, k, i] * x[n, g, c, i + d_k]      (apply weights)
    correlate(a, b)[n, g, k, i] = sum_c a[n, g, c, i] * b[n, g, c, i + d_k]      (attention logits)

with d_k the k-th offset of the K x K neighbourhood (row-major), and zeros outside the map. They are
each other's gradients: d aggregate / d w is a correlate, d correlate / d a is an aggregate, and the
gradient with respect to the shifted operand scatters back through the same K*K shifts. Writing the
backward by hand matters: autograd of `w[:, :, k]` would materialise a full-size zero gradient of w
for each of the K*K slices. No unfold of the map either: memory stays at a few map-sized buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sliding_aggregate", "sliding_correlate"]


class _FlatGrid:
    """Positions of an H x W map laid out on rows of width W + 2p, flattened.

    On this grid every neighbour offset (dy, dx) is one flat offset dy * (W + 2p) + dx, so each of
    the K*K shifted views is a contiguous run of H * (W + 2p) values per channel instead of H short
    rows of W: the elementwise kernels vectorise over long runs (20x longer at 14 x 14, K = 7). The
    2p extra columns per row are computed and dropped. Offsets whose whole K x K row or column lies
    outside a small map are skipped: they only ever read zeros.
    """

    def __init__(self, h: int, w: int, kernel_size: int):
        p = kernel_size // 2
        self.h, self.w, self.p, self.row = h, w, p, w + 2 * p
        self.length = h * self.row
        self.offsets = [(k, (k // kernel_size) * self.row + k % kernel_size)
                        for k in range(kernel_size * kernel_size)
                        if abs(k // kernel_size - p) < h and abs(k % kernel_size - p) < w]

    def pad_input(self, t: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> (..., (H + 2p + 1) * row): zero padded, one spare row for the last shifts."""
        p = self.p
        return F.pad(t, (p, p, p, p + 1)).flatten(-2)

    def to_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> (..., H * row): the output positions, with zeros in the extra columns."""
        return F.pad(t, (0, 2 * self.p)).flatten(-2)

    def from_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(..., H * row) -> (..., H, W)."""
        return t.unflatten(-1, (self.h, self.row))[..., : self.w].contiguous()

    def crop_input(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of pad_input for a gradient: (..., (H + 2p + 1) * row) -> (..., H, W)."""
        p = self.p
        return t.unflatten(-1, (self.h + 2 * p + 1, self.row))[..., p: p + self.h, p: p + self.w].contiguous()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    n, g, c, h, wd = x.shape
    grid = _FlatGrid(h, wd, kernel_size)
    xf, wf = grid.pad_input(x), grid.to_grid(w)
    y = torch.zeros((max(n, w.shape[0]), g, c, grid.length), dtype=_accumulation_dtype(x.dtype),
                    device=x.device)
    for k, off in grid.offsets:
        y.addcmul_(wf[:, :, k, None], xf[..., off: off + grid.length])
    return grid.from_grid(y).to(x.dtype)


def _scatter(y: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The transpose of `_aggregate` in x: out[i + d_k] += w[k, i] * y[i]."""
    n, g, c, h, wd = y.shape
    grid = _FlatGrid(h, wd, kernel_size)
    yf, wf = grid.to_grid(y), grid.to_grid(w)
    out = torch.zeros((n, g, c, (h + 2 * grid.p + 1) * grid.row), dtype=_accumulation_dtype(y.dtype),
                      device=y.device)
    for k, off in grid.offsets:
        out[..., off: off + grid.length].addcmul_(wf[:, :, k, None], yf)
    return grid.crop_input(out).to(y.dtype)


def _correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int) -> torch.Tensor:
    n, g, _, h, wd = a.shape
    grid = _FlatGrid(h, wd, kernel_size)
    af, bf = grid.to_grid(a), grid.pad_input(b)
    out = torch.zeros((n, g, kernel_size * kernel_size, grid.length), dtype=a.dtype, device=a.device)
    for k, off in grid.offsets:
        out[:, :, k] = (af * bf[..., off: off + grid.length]).sum(dim=2)
    return grid.from_grid(out)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the batch where the operand was shared (size 1) across it."""
    return grad.sum(0, keepdim=True) if shape[0] == 1 and grad.shape[0] != 1 else grad


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, kernel_size):
        ctx.save_for_backward(x, w)
        ctx.kernel_size = kernel_size
        return _aggregate(x, w, kernel_size)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        k = ctx.kernel_size
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _reduce_to(_scatter(grad_y, w, k), x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _reduce_to(_correlate(grad_y, x, k), w.shape)
        return grad_x, grad_w, None


class _Correlate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, kernel_size):
        ctx.save_for_backward(a, b)
        ctx.kernel_size = kernel_size
        return _correlate(a, b, kernel_size)

    @staticmethod
    def backward(ctx, grad_l):
        a, b = ctx.saved_tensors
        k = ctx.kernel_size
        grad_a = _aggregate(b, grad_l, k) if ctx.needs_input_grad[0] else None
        grad_b = _scatter(a, grad_l, k) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def sliding_aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, G, Cg, H, W), w (N|1, G, K*K, H, W) -> y (N, G, Cg, H, W)."""
    return _Aggregate.apply(x, w, kernel_size)


def sliding_correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """a, b (N, G, Cg, H, W) -> logits (N, G, K*K, H, W)."""
    return _Correlate.apply(a, b, kernel_size)
