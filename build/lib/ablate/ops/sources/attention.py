"""`dynamic: attention`: w[n, g, i, j] = softmax over j in N(i) of (q_i . k_j / sqrt(d) + bias[g, i-j]).

The query and key are 1x1 projections of the operator's context (in the Swin block: the normed block
input, as Swin's q and k); the values are what the layout aggregates (Swin's v). One head per weight
group, so the head width is `channels_per_group`. The relative-position bias is a static,
offset-shared weight added to the logits, laid out as timm's Swin table.
"""
from __future__ import annotations

import torch
from torch import nn

from ablate.ops.functional import sliding_correlate
from ablate.ops.registry import register_source
from ablate.ops.sources.base import WeightSource


class _Attention(WeightSource):
    def __init__(self, layout, dim, groups, dynamic, context_dim, bias_entries: int):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.scale = (dim // groups) ** -0.5
        self.qk = nn.Conv2d(context_dim, 2 * dim, 1, bias=dynamic.qkv_bias)
        nn.init.trunc_normal_(self.qk.weight, std=0.02)
        if self.qk.bias is not None:
            nn.init.zeros_(self.qk.bias)
        self.position_bias = None
        if dynamic.position_bias:
            self.position_bias = nn.Parameter(torch.zeros(groups, bias_entries))
            nn.init.trunc_normal_(self.position_bias, std=0.02)
        # windows padded to a multiple of the window compute logits at the padded positions too
        padded = getattr(layout, "padded", layout.resolution)
        self.logit_positions = padded[0] * padded[1]

    def macs(self) -> int:
        # the q, k projection on the map, then one dot product of width dim per position and neighbour
        return (self.positions * self.context_dim * 2 * self.dim
                + self.logit_positions * self.dim * self.neighbours)


@register_source("attention", "windowed", "none")
class WindowAttentionWeights(_Attention):
    """Local (Swin) or, with one window over the map, global attention. -> (N, nW, G, T, T)."""

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim, layout.offsets)

    def forward(self, context: torch.Tensor, layout) -> torch.Tensor:
        qk = layout.partition(self.qk(context))  # (N, nW, 2C, T)
        n, nw, _, t = qk.shape
        q, k = qk.reshape(n, nw, 2, self.groups, -1, t).unbind(2)
        logits = torch.einsum("nwgci,nwgcj->nwgij", q * self.scale, k)
        if self.position_bias is not None:
            logits = logits + self.position_bias[:, layout.relative_index]
        return layout.mask_logits(logits).softmax(dim=-1)


@register_source("attention", "sliding", "none")
class NeighbourhoodAttentionWeights(_Attention):
    """Attention over each position's own K x K neighbourhood (NAT-style). -> (N, G, K*K, H, W).

    Neighbours outside the map are masked out (not read as zeros), so a border position attends
    over the part of its neighbourhood that exists.
    """

    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim, layout.tokens)

    def forward(self, context: torch.Tensor, layout, correlate=None) -> torch.Tensor:
        """`correlate`: a faster implementation of `sliding_correlate` (the fast backend's), or None
        for the reference."""
        n, _, h, w = context.shape
        q, k = self.qk(context).reshape(n, 2, self.groups, -1, h, w).unbind(1)
        logits = (correlate and correlate(q * self.scale, k, layout.kernel_size))
        if logits is None:
            logits = sliding_correlate(q * self.scale, k, layout.kernel_size)
        if self.position_bias is not None:
            logits = logits + self.position_bias[None, :, :, None, None]
        logits = logits.masked_fill(~layout.inside, float("-inf"))
        return logits.softmax(dim=2)
