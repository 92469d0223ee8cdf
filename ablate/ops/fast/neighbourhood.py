"""Neighbourhood attention on a GPU: three ways to compute it, the fastest timed per shape (routes.py).

Neighbourhood attention's core, softmax(q k^T + bias, over each position's K x K neighbourhood) v,
has no single best kernel on a GPU, for reasons no CPU test can weigh:

- "flex": FlexAttention (flex.py) with 128-token tiles, its default. Fused (no logits in memory),
  but a tile of queries computes every key of each tile of keys it touches, 12.7x the 49 keys a
  query needs at tiny stage 1 (`flex.visited_keys`), and the bias table's gradient is summed by
  atomic adds that every query of the batch sends to the table's K*K entries per head.
- "flex 64-token tiles": the same kernel on 64-token tiles (8.8x at stage 1, 1.7x instead of 6.8x at
  stage 4) and the bias in 64 copies, one per query row modulo 64, so that a tile's atomic adds go
  to as many addresses as it has rows. Its tiles must fit the GPU's FlexAttention configurations
  (on an H100 or H200 they do); where they do not, the timing leaves it out.
- "triton logits in memory": exactly the K*K logits of every position (`triton_dw.position_correlate`,
  the per-position weight gradient's kernel), the bias, the mask and the softmax as tensors, then the
  per-position aggregate through its own route: the reference's arithmetic, no wasted keys, no
  atomics, at the price of the (N, G, K*K, H, W) logits and weights in memory.

`attention` applies a `NeighbourhoodAttentionWeights` source through the chosen one; every candidate
equals the reference operator, forward and gradients (tests/test_fast_paths.py on the CPU, the
candidates one by one on a GPU under `-m gpu`).
"""
from __future__ import annotations

import torch

from ablate.ops.fast import flex, routes
from ablate.ops.functional import sliding_aggregate, sliding_correlate

__all__ = ["FORM", "attention", "logits_in_memory"]

FORM = "neighbourhood attention"


def _map(rows: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """(N, G, T, d) rows -> the (N, G*d, H, W) map they are, as a view (channels_last-like strides)."""
    n, g, _, d = rows.shape
    return rows.transpose(1, 2).reshape(n, *resolution, g * d).permute(0, 3, 1, 2)


def _rows(y: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_map`: (N, C, H, W) -> (N, G, T, d)."""
    n, c, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(n, h * w, groups, c // groups).transpose(1, 2)


def _reference_correlate(a, b, k, groups):
    n, c, h, w = a.shape
    return sliding_correlate(*(t.reshape(n, groups, c // groups, h, w) for t in (a, b)), k)


def _reference_aggregate(layout, x, w):
    n, c, h, wd = x.shape
    return sliding_aggregate(x.reshape(n, w.shape[1], -1, h, wd), w, layout.kernel_size).reshape(n, c, h, wd)


def logits_in_memory(layout, q, k, v, bias) -> torch.Tensor:
    """The core with its logits as a tensor: on a GPU the Triton correlate and the per-position
    aggregate's route; elsewhere the reference's functions (the tests)."""
    groups = q.shape[1]
    if q.is_cuda:
        from ablate.ops.fast import triton_dw  # a GPU's (compiles at first call)
        correlate, aggregate = triton_dw.position_correlate, routes.aggregate
    else:
        correlate, aggregate = _reference_correlate, _reference_aggregate
    logits = correlate(_map(q, layout.resolution), _map(k, layout.resolution), layout.kernel_size, groups)
    if bias is not None:
        logits = logits + bias[None, :, :, None, None]
    weights = logits.masked_fill(~layout.inside, float("-inf")).softmax(dim=2)
    y = aggregate(layout, _map(v, layout.resolution), weights.to(v.dtype))
    return _rows(y, groups)


def _flex(block: int, rows: int):
    def candidate(layout, q, k, v, bias):
        return flex.neighbourhood(q, k, v, bias, layout.resolution, layout.kernel_size, block, rows)
    return candidate


routes.register(FORM, {
    "flex": _flex(128, 1),
    "flex 64-token tiles": _flex(64, 64),
    "triton logits in memory": logits_in_memory,
})


def attention(source, x, context, layout, value_proj=None) -> torch.Tensor:
    """A `NeighbourhoodAttentionWeights` source applied through the chosen candidate."""
    return flex.attend_rows(source, x, context, value_proj,
                            lambda q, k, v: routes.run(FORM, layout, q, k, v, source.position_bias))
