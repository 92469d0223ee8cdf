"""Inhomogeneous dynamic depth-wise convolution with one channel per group, without its weights.

I-D-DW conv predicts at every position p one K x K kernel per group: w(p) = W2 h(p) + b2, h(p) being
the predictor's hidden features (1x1 conv, BN, ReLU) and W2, b2 its last 1x1 convolution. With one
channel per group (G = C: the embedded micro model's first stage, 32 channels in 32 groups) the
weights (N, C, K*K, H, W) are K*K = 49 times the size of the input, and applying them is bound by
moving them through memory (157 MB per batch of 128 at micro, written, read, and the same again for
their gradient). By linearity the same output is

    y_c(p) = sum_k w_ck(p) x_c(p+k) = sum_j h'_j(p) z_cj(p),   z_cj(p) = sum_k W2'_ckj x_c(p+k),

with h' = [h, 1] and W2' = [W2, b2]: a static depth-wise convolution with Ch + 1 kernels per channel
(same MACs as predicting the weights: Ch K^2 per channel and position, plus K^2 for the bias), then a
contraction over j of Ch + 1 numbers per channel, where z is only (Ch + 1) / K^2 the size of w.

Measured at micro stage 1 (batch 128, 32 channels, 14x14, K = 7, predictor included, forward and
backward): 193 ms materialised (native kernels) -> 87 ms. With more channels per group the static
kernels are repeated per channel and the MACs grow with the channels per group: 1.6x slower at 2,
7x at 3 (micro stage 2, tiny stage 1), so this form is used at one channel per group only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["applies", "inhomogeneous_sliding"]


def applies(source, layout, x: torch.Tensor) -> bool:
    """Whether the decomposition applies and pays: an I-D-DW conv source with one channel per group,
    on the CPU (float64 stays on the reference, the exact checks)."""
    from ablate.ops.sources.dynamic import InhomogeneousSliding

    return (type(source) is InhomogeneousSliding and source.dim == source.groups
            and layout.kind == "sliding" and x.device.type == "cpu" and x.dtype != torch.float64)


def inhomogeneous_sliding(source, x: torch.Tensor, context: torch.Tensor, layout) -> torch.Tensor:
    """y (N, C, H, W) of an `InhomogeneousSliding` source with G = C: x aggregated with the weights
    that `source` predicts from `context`, never materialised."""
    n, c, h, w = x.shape
    k = layout.kernel_size
    *hidden_layers, last = source.predict  # 1x1 conv, BN, ReLU | 1x1 conv to G * K*K
    hidden = context
    for layer in hidden_layers:
        hidden = layer(hidden)
    j = hidden.shape[1] + 1
    weight = last.weight.view(c, k * k, j - 1)
    bias = last.bias.view(c, k * k, 1) if last.bias is not None else weight.new_zeros(c, k * k, 1)
    kernels = torch.cat([weight, bias], 2).transpose(1, 2).reshape(c * j, 1, k, k)
    z = F.conv2d(x, kernels.to(x.dtype), padding=layout.pad, groups=c)  # (N, C * J, H, W)
    ones = hidden.new_ones(n, 1, h, w)
    coeffs = torch.cat([hidden, ones], 1)  # (N, J, H, W)
    # contract over j position by position: rows of channels_last memory, no copy when x is one
    rows = z.permute(0, 2, 3, 1).reshape(-1, c, j) * coeffs.permute(0, 2, 3, 1).reshape(-1, 1, j)
    return rows.sum(-1).view(n, h, w, c).permute(0, 3, 1, 2)
