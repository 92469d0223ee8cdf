"""Window attention through `scaled_dot_product_attention`, in NHWC.

The reference builds the attention weights w (softmax of the logits) as a tensor and hands it to the
layout, which applies it; that is what lets every operator show its effective weights. Here q, k and
v go to one fused attention call instead: the (N, nW, G, T, T) weights are never stored for the
backward, and the position bias and the shift mask enter as one additive mask per window.

The roll and the window partition run on NHWC views: on a channels_last model (the fast layout on
CPU and GPU alike, where 1x1 convolutions are plain GEMMs) the views are free and one copy cuts the
map into windows of contiguous (position, channel) rows, the layout the fused kernels read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["window_attention"]

_CPU_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _windows(t: torch.Tensor, layout, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * nW, G, T, Cg): roll, pad, partition, in one copy of an NHWC view."""
    n, c = t.shape[:2]
    t = t.permute(0, 2, 3, 1)
    if any(layout.shift):
        t = torch.roll(t, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
    ph, pw = layout.padded[0] - layout.resolution[0], layout.padded[1] - layout.resolution[1]
    if ph or pw:
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
    (gh, gw), (wh, ww) = layout.grid, layout.window
    t = t.reshape(n, gh, wh, gw, ww, groups, c // groups).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(n * gh * gw, groups, wh * ww, c // groups)


def _merge(y: torch.Tensor, layout, n: int) -> torch.Tensor:
    """(N * nW, G, T, Cg) -> (N, C, H, W) in channels_last memory: the inverse of `_windows`."""
    (gh, gw), (wh, ww) = layout.grid, layout.window
    g, cg = y.shape[1], y.shape[-1]
    y = y.reshape(n, gh, gw, g, wh, ww, cg).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, gh * wh, gw * ww, g * cg)
    y = y[:, : layout.resolution[0], : layout.resolution[1]]
    if any(layout.shift):
        y = torch.roll(y, shifts=layout.shift, dims=(1, 2))
    return y.permute(0, 3, 1, 2)


def window_attention(source, x: torch.Tensor, context: torch.Tensor, layout) -> torch.Tensor:
    """y (N, C, H, W) of a `WindowAttentionWeights` source: values x, queries and keys from context."""
    n, c = x.shape[:2]
    g = source.groups
    qk = _windows(source.qk(context), layout, 2 * g)  # (N * nW, 2G, T, Cg)
    q, k = qk[:, :g], qk[:, g:]
    v = _windows(x, layout, g)
    t, nw = layout.tokens, layout.num_windows
    mask = None
    if source.position_bias is not None:
        mask = source.position_bias[:, layout.relative_index][None]  # (1, G, T, T)
    if layout.same_region is not None:
        blocked = torch.zeros(layout.same_region.shape, dtype=q.dtype, device=q.device)
        blocked = blocked.masked_fill(~layout.same_region, float("-inf"))[:, None]  # (nW, 1, T, T)
        mask = blocked if mask is None else mask + blocked
    if mask is not None:  # one mask per window, shared over the batch: (N * nW, G, T, T) as a view
        mask = mask.to(q.dtype).expand(nw, g, t, t)
        mask = mask[None].expand(n, nw, g, t, t).reshape(n * nw, g, t, t)
    if q.device.type == "cpu":
        # With a mask, the CPU dispatcher picks the unfused math kernel (bmm, softmax, bmm). The flash
        # kernel takes the same mask and is 2.4x faster at Swin-T's stage-1 windows, but only where
        # the mask needs no gradient (inference, or no learned position bias): try it first.
        with sdpa_kernel(_CPU_ORDER, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=source.scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=source.scale)
    return _merge(y, layout, n)
