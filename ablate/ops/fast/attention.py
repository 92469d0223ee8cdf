"""Window attention without materialising the reference's weight tensor, in NHWC rows.

The reference builds the attention weights w (softmax of the logits) as a (N, nW, G, T, T) tensor and
hands it to the layout, which applies it; that is what lets every operator show its effective
weights. The fast path computes the same operator the way Swin's own code does, with less traffic:

- one GEMM for the projections: the queries (with the 1/sqrt(d) scale folded into their weights),
  the keys and, when the block hands over its value projection (`SpatialMixer(..., value_proj=)`),
  the values too, as Swin's fused qkv;
- one gather for the roll, the padding and the window partition (`WindowLayout.window_rows`), and
  one for the way back, on the (position, channel) rows of a channels_last map;
- the position bias and the shift mask as one additive (nW, G, T, T) term;
- `scaled_dot_product_attention` where its fused kernels take the mask: always on a GPU, and on a
  CPU when the mask needs no gradient (inference, or no learned position bias). The CPU's fused
  kernel cannot return the mask's gradient, and its unfused fallback spends a pass over the logits
  guarding fully masked rows (which windows never have), so training on a CPU runs the three steps
  (q k^T plus the mask, softmax, times v) as Swin does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["window_attention", "fusable_projection"]

_CPU_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def fusable_projection(module: nn.Module | None, in_channels: int) -> bool:
    """Whether `module` is a plain 1x1 convolution of `in_channels` (one GEMM per position)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1
            and module.in_channels == in_channels)


def _gather_windows(rows: torch.Tensor, layout) -> torch.Tensor:
    """(N, H * W, P) map rows -> (N * nW * T, P) rows in window order: roll, pad, partition."""
    n, positions, p = rows.shape
    if layout.padded != layout.resolution:  # padding positions read an appended zero row
        rows, positions = F.pad(rows, (0, 0, 0, 1)), positions + 1
    index = layout.window_rows[None] + positions * torch.arange(n, device=rows.device)[:, None]
    return rows.reshape(n * positions, p).index_select(0, index.reshape(-1))


def _gather_map(rows: torch.Tensor, layout, n: int) -> torch.Tensor:
    """(N * nW * T, P) rows in window order -> (N, H * W, P) map rows: the inverse."""
    slots = layout.window_rows.numel()
    index = layout.window_slots[None] + slots * torch.arange(n, device=rows.device)[:, None]
    return rows.index_select(0, index.reshape(-1)).view(n, -1, rows.shape[-1])


# The two gathers are each other's transpose (every map position sits in exactly one window slot;
# padding slots read zeros), so each one's backward is the other: a gather, where autograd's own
# backward of a gather would zero a buffer and scatter-add into it.
class _ToWindows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, layout):
        ctx.layout, ctx.n = layout, rows.shape[0]
        return _gather_windows(rows, layout)

    @staticmethod
    def backward(ctx, grad):
        return _FromWindows.apply(grad, ctx.layout, ctx.n), None


class _FromWindows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, layout, n):
        ctx.layout = layout
        return _gather_map(rows, layout, n)

    @staticmethod
    def backward(ctx, grad):
        return _ToWindows.apply(grad, ctx.layout), None, None


def _to_windows(t: torch.Tensor, layout) -> torch.Tensor:
    """(N, P, H, W) -> (N * nW * T, P) rows in window order (a view of a channels_last map, gathered)."""
    n, p, h, w = t.shape
    return _ToWindows.apply(t.permute(0, 2, 3, 1).reshape(n, h * w, p), layout)


def _from_windows(rows: torch.Tensor, layout, n: int) -> torch.Tensor:
    """(N * nW * T, C) rows in window order -> (N, C, H, W) in channels_last memory."""
    h, w = layout.resolution
    return _FromWindows.apply(rows, layout, n).view(n, h, w, -1).permute(0, 3, 1, 2)


def _additive_mask(source, layout, dtype) -> torch.Tensor | None:
    """The position bias plus the shift mask (-inf between regions): (nW | 1, G, T, T), or None."""
    mask = None
    if source.position_bias is not None:
        mask = source.position_bias[:, layout.relative_index][None].to(dtype)  # (1, G, T, T)
    if layout.same_region is not None:
        blocked = torch.zeros(layout.same_region.shape, dtype=dtype, device=layout.same_region.device)
        blocked = blocked.masked_fill(~layout.same_region, float("-inf"))[:, None]  # (nW, 1, T, T)
        mask = blocked if mask is None else mask + blocked
    return mask


def _attend(q, k, v, mask, n: int) -> torch.Tensor:
    """softmax(q k^T + mask) v over (N * nW, G, T, Cg) windows; q carries the scale already."""
    if mask is not None and q.device.type == "cpu" and mask.requires_grad and torch.is_grad_enabled():
        logits = torch.matmul(q, k.transpose(-2, -1))
        logits = logits.view(n, -1, *logits.shape[1:]) + mask  # the mask is shared over the batch
        return torch.matmul(logits.softmax(dim=-1).flatten(0, 1), v)
    if mask is not None:  # one mask per window, the same for every image: (N * nW, G, T, T)
        b, g, t = q.shape[:3]
        mask = mask.expand(b // n, g, t, t)[None].expand(n, b // n, g, t, t).reshape(b, g, t, t)
    if q.device.type == "cpu":  # flash takes the mask where it needs no gradient: try it first
        with sdpa_kernel(_CPU_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def _fused_projection(source, value_proj: nn.Module | None):
    """Weight and bias of one 1x1 convolution giving [q * scale, k] (and v, with `value_proj`)."""
    q_w, k_w = source.qk.weight.chunk(2)
    q_b, k_b = source.qk.bias.chunk(2) if source.qk.bias is not None else (None, None)
    pairs = [(q_w * source.scale, None if q_b is None else q_b * source.scale), (k_w, k_b)]
    if value_proj is not None:
        pairs.append((value_proj.weight, value_proj.bias))
    weight = torch.cat([w for w, _ in pairs])
    if all(b is None for _, b in pairs):
        return weight, None
    return weight, torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in pairs])


def window_attention(source, x: torch.Tensor, context: torch.Tensor, layout,
                     value_proj: nn.Module | None = None) -> torch.Tensor:
    """y (N, C, H, W) of a `WindowAttentionWeights` source: queries and keys from `context`; values x,
    or `value_proj(x)` when it is given (then `x` is the context, and one GEMM makes all three)."""
    n, t = x.shape[0], layout.tokens
    g, dim = source.groups, source.dim
    weight, bias = _fused_projection(source, value_proj)
    rows = _to_windows(F.conv2d(context, weight, bias), layout)  # (N * nW * T, 2C or 3C)
    parts = rows.view(-1, t, weight.shape[0] // dim, g, dim // g).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = parts[:2]
    if value_proj is None:
        v = _to_windows(x, layout).view(-1, t, g, dim // g).transpose(1, 2)
    else:
        v = parts[2]
    y = _attend(q, k, v, _additive_mask(source, layout, q.dtype), n)  # (N * nW, G, T, Cg)
    return _from_windows(y.transpose(1, 2).reshape(-1, dim), layout, n)
