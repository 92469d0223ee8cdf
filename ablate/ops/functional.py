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


def _windows(padded: torch.Tensor, kernel_size: int, h: int, w: int):
    """Yield (k, view of the padded map shifted by the k-th offset), for k over the K*K offsets."""
    for k in range(kernel_size * kernel_size):
        dy, dx = divmod(k, kernel_size)
        yield k, padded[..., dy: dy + h, dx: dx + w]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _pad(t: torch.Tensor, kernel_size: int) -> torch.Tensor:
    p = kernel_size // 2
    return F.pad(t, (p, p, p, p))


def _aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    n, g, c, h, wd = x.shape
    y = torch.zeros((max(n, w.shape[0]), g, c, h, wd), dtype=_accumulation_dtype(x.dtype), device=x.device)
    for k, x_k in _windows(_pad(x, kernel_size), kernel_size, h, wd):
        y.addcmul_(w[:, :, k, None], x_k)
    return y.to(x.dtype)


def _scatter(y: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The transpose of `_aggregate` in x: out[i + d_k] += w[k, i] * y[i]."""
    n, g, c, h, wd = y.shape
    p = kernel_size // 2
    out = torch.zeros((n, g, c, h + 2 * p, wd + 2 * p), dtype=_accumulation_dtype(y.dtype), device=y.device)
    for k, out_k in _windows(out, kernel_size, h, wd):
        out_k.addcmul_(w[:, :, k, None], y)
    return out[..., p: p + h, p: p + wd].to(y.dtype)


def _correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int) -> torch.Tensor:
    n, g, _, h, wd = a.shape
    out = torch.empty((n, g, kernel_size * kernel_size, h, wd), dtype=a.dtype, device=a.device)
    for k, b_k in _windows(_pad(b, kernel_size), kernel_size, h, wd):
        out[:, :, k] = (a * b_k).sum(dim=2)
    return out


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
