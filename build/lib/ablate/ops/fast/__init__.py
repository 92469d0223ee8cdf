"""Fast paths of the operators, chosen per call by device, dtype and size; the reference elsewhere.

| operator | CPU | GPU (NHWC) |
|---|---|---|
| static depth-wise (sliding, offset) | oneDNN depth-wise conv, channels_last | timed (1) |
| homogeneous dynamic (kernel per instance) | compiled shift-and-accumulate | timed (1) |
| inhomogeneous dynamic, locally connected | native loops (sliding.c), compiled if large | timed (1) |
| I-D-DW conv, one channel per group | weights never materialised (predicted.py) | timed (1) |
| neighbourhood attention | native loops (sliding.c) for logits and aggregation | timed (2) |
| window attention (local) | SDPA; training with a learned bias: chunks | SDPA |
| window matrices (local MLP, window conv) | the reference (einsum on windows) | timed (3) |
| global attention (one window of >= 128 tokens) | as window attention | timed (2) |

`aggregate` and `fused_forward` return None where no fast path applies; the caller then runs the
reference. Every fast path is checked against its reference in tests/test_fast_paths.py. The native
and Triton kernels are torch.library operators, so a compiled model keeps them as single calls.

(1) On a GPU the depth-wise family's path is timed per shape at its first call and the fastest
kept (`routes.py`): static weights through cuDNN channels_last or Triton; per-instance kernels
through the batch-folded conv in NCHW or NHWC, or Triton; per-position weights through Triton (on
each of three tiles), the reference's shift-and-accumulate or unfold-multiply-sum. One H200
(`python -m ablate.bench --device cuda --section ops`, bf16, batch 128, tiny stages 1-2, forward +
backward) had a different winner per form: static weights cuDNN channels_last 1.3 ms against
Triton's 8.7; per-instance kernels the batch-folded conv 6.0 ms against Triton's 8.7; per-position
weights Triton 36 ms against unfold-multiply-sum's 38 and the reference's 45 (Triton's kernels then
unrolled their K*K taps; they loop now: triton_dw.py).

(2) Neighbourhood and global attention's cores are timed the same way (`wide_attention.py`):
FlexAttention with 128- or 64-token tiles, the logits in memory through Triton, or Triton's fused
kernels over exactly each query's K*K keys or over halo tiles on the tensor cores (neighbourhood);
FlexAttention, or SDPA with the bias expanded to a mask (global).

(3) Window matrices up to 8 x 8 tokens: the reference's einsum on windows cut out of the map (pad,
roll and reshape copies of it, both ways, each pass), or Triton kernels that address each window's
tokens where they lie on the map and read and write the map once (`triton_window.py`).
"""
from __future__ import annotations

import torch

from ablate.ops.fast import cpu, native, predicted, routes, wide_attention
from ablate.ops.fast.attention import fusable_projection, window_attention
from ablate.ops.fast.routes import depthwise_conv_channels_last

__all__ = ["aggregate", "depthwise_conv_channels_last", "fused_forward"]

def aggregate(layout, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """A fast `layout.aggregate(x, w)`, or None."""
    gpu = routes.routed(x)
    if layout.kind == "windowed":
        return routes.aggregate(layout, x, w) if gpu and layout.tokens <= routes.MAX_WINDOW_TOKENS else None
    if layout.kind != "sliding":
        return None
    k = layout.kernel_size
    if gpu:
        return routes.aggregate(layout, x, w)
    n, c, h, wd = x.shape
    if w.dim() == 5 and _native_pays(x):
        g = w.shape[1]
        y = native.aggregate(x.reshape(n, g, c // g, h, wd), w, k)
        if y is not None:
            return y.reshape(n, c, h, wd)
    if not cpu.compile_pays(x):
        return None
    if w.dim() == 3 and w.shape[0] == 1:
        return depthwise_conv_channels_last(x, w, k)
    if w.dim() == 3:
        return cpu.kernel_aggregate(x, w, k)
    g = w.shape[1]
    return cpu.position_aggregate(x.reshape(n, g, c // g, h, wd), w, k).reshape(n, c, h, wd)


def _native_pays(x: torch.Tensor) -> bool:
    """The native per-position kernels run on CPU float32 (float64 stays on the reference: the exact
    checks) below the size where the compiled form takes over."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not cpu.compile_pays(x)
            and native.available())


def correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int) -> torch.Tensor | None:
    """A fast `sliding_correlate(a, b, kernel_size)` (neighbourhood attention's logits), or None."""
    return native.correlate(a, b, kernel_size) if _native_pays(a) else None


# A single window (global attention, or a window covering a small map) is timed from one FlexAttention
# tile of tokens on; below it, SDPA's kernels on the materialised bias are as cheap.
FLEX_MIN_TOKENS = 128


def fused_forward(mixer, x: torch.Tensor, context: torch.Tensor, value_proj=None) -> torch.Tensor | None:
    """The mixer's output without materialising its weights (attention, I-D-DW conv at one channel per
    group), or None."""
    from ablate.ops.sources.attention import NeighbourhoodAttentionWeights, WindowAttentionWeights
    source, layout = mixer.weights, mixer.layout
    if predicted.applies(source, layout, x):
        values = x if value_proj is None else value_proj(x)
        return predicted.inhomogeneous_sliding(source, values, context, layout)
    kind = type(source)
    if kind not in (NeighbourhoodAttentionWeights, WindowAttentionWeights) or x.dtype == torch.float64:
        return None
    if value_proj is not None and not (context is x and fusable_projection(value_proj, x.shape[1])):
        x, value_proj = value_proj(x), None  # values from their own projection, then as usual
    if kind is NeighbourhoodAttentionWeights:
        if routes.routed(x):
            return wide_attention.neighbourhood_attention(source, x, context, layout, value_proj)
        if not _native_pays(x):
            return None
        values = x if value_proj is None else value_proj(x)
        return aggregate(layout, values, source(context, layout, correlate=correlate))
    if routes.routed(x) and layout.num_windows == 1 and layout.tokens >= FLEX_MIN_TOKENS:
        return wide_attention.global_attention(source, x, context, layout, value_proj)
    return window_attention(source, x, context, layout, value_proj)
