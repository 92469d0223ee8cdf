"""Attention over more keys than a window, on a GPU: neighbourhood and global attention, each among
candidates timed per shape (routes.py).

Both operators attend over the rows of the whole map (q, k and v are views of one projection:
`attention.attend_rows`), and for both the fastest kernel depends on costs no CPU test can weigh.

Neighbourhood attention, softmax(q k^T + bias over each position's K x K neighbourhood) v:

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
- "triton fused": exactly the K*K keys of every query and no logits in memory
  (`triton_neighbourhood.py`): a program walks the offsets of a tile of queries with an online
  softmax, and the backward recomputes the probabilities from the saved log-sum-exp; scores on CUDA
  cores (a dot product per offset) instead of FlexAttention's tensor-core tiles, no atomics.
- "triton fused, halo tiles": the same operator on the tensor cores: a 4 x 4 tile of queries against
  the keys around it (100 at K = 7: 2.6x the keys a query needs, against FlexAttention's 8.8x-12.7x),
  its keys' gradients added by atomics (neighbouring tiles' halos overlap).

Global attention (one window over the whole map, from FLEX_MIN_TOKENS tokens on), with Swin's
relative position bias:

- "flex": FlexAttention, the bias read from its table by each pair's offset; the table's gradient
  is an atomic add per score, N * G * T^2 of them (3.8e9 per layer at tiny stage 1, batch 128);
- "sdpa, bias as a mask": the table expanded to a (G, T, T) additive mask for
  `scaled_dot_product_attention`'s memory-efficient kernel, whose backward writes the mask's gradient
  per image (N * G * T^2 values, 7.5 GB in bf16 at that size) and sums it over the batch: no
  atomics, much memory (where it does not fit, the timing leaves it out).

Every candidate equals the reference operator, forward and gradients (tests/test_fast_paths.py on
the CPU; each candidate on a GPU under `-m gpu`).
"""
from __future__ import annotations

import torch

from ablate.ops.fast import attention, flex, routes
from ablate.ops.functional import sliding_correlate

__all__ = ["NEIGHBOURHOOD", "GLOBAL", "neighbourhood_attention", "global_attention", "logits_in_memory"]

NEIGHBOURHOOD, GLOBAL = "neighbourhood attention", "global attention"


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


def logits_in_memory(layout, q, k, v, bias) -> torch.Tensor:
    """Neighbourhood attention's core with its logits as a tensor: on a GPU the Triton correlate and
    the per-position aggregate's route; elsewhere the reference's functions (the tests)."""
    groups = q.shape[1]
    if routes.routed(q):
        from ablate.ops.fast import triton_dw  # a GPU's (compiles at first call)
        correlate, aggregate = triton_dw.position_correlate, routes.aggregate
    else:
        correlate, aggregate = _reference_correlate, lambda layout, x, w: layout.aggregate(x, w)
    logits = correlate(_map(q, layout.resolution), _map(k, layout.resolution), layout.kernel_size, groups)
    if bias is not None:
        logits = logits + bias[None, :, :, None, None]
    weights = logits.masked_fill(~layout.inside, float("-inf")).softmax(dim=2)
    y = aggregate(layout, _map(v, layout.resolution), weights.to(v.dtype))
    return _rows(y, groups)


def _triton_fused(halo: bool):
    def candidate(layout, q, k, v, bias):
        from ablate.ops.fast import triton_neighbourhood  # a GPU's (compiles at first call)

        return triton_neighbourhood.neighbourhood_attention(q, k, v, bias, layout.resolution,
                                                            layout.kernel_size, halo)
    return candidate


def _flex_neighbourhood(block: int, rows: int):
    def candidate(layout, q, k, v, bias):
        return flex.neighbourhood(q, k, v, bias, layout.resolution, layout.kernel_size, block, rows)
    return candidate


def _sdpa_global(layout, q, k, v, bias):
    mask = None if bias is None else bias[:, layout.relative_index][None].to(q.dtype)  # (1, G, T, T)
    return attention.attend(q, k, v, mask, q.shape[0])


routes.register(NEIGHBOURHOOD, {
    "flex": _flex_neighbourhood(128, 1),
    "flex 64-token tiles": _flex_neighbourhood(64, 64),
    "triton logits in memory": logits_in_memory,
    "triton fused": _triton_fused(halo=False),
    "triton fused, halo tiles": _triton_fused(halo=True),
})
routes.register(GLOBAL, {
    "flex": lambda layout, q, k, v, bias: flex.global_(q, k, v, bias, layout.resolution),
    "sdpa, bias as a mask": _sdpa_global,
})


def neighbourhood_attention(source, x, context, layout, value_proj=None) -> torch.Tensor:
    """A `NeighbourhoodAttentionWeights` source applied through the chosen candidate."""
    return attention.attend_rows(source, x, context, value_proj, lambda q, k, v: routes.run(
        NEIGHBOURHOOD, layout, q, k, v, source.position_bias))


def global_attention(source, x, context, layout, value_proj=None) -> torch.Tensor:
    """A `WindowAttentionWeights` source whose one window is the whole map, through the chosen
    candidate."""
    return attention.attend_rows(source, x, context, value_proj, lambda q, k, v: routes.run(
        GLOBAL, layout, q, k, v, source.position_bias))
