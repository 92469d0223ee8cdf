"""Fast paths of the operators, chosen per call by device, dtype and size; the reference elsewhere.

| operator | CPU | GPU (Triton, NHWC) |
|---|---|---|
| static depth-wise (sliding, offset) | oneDNN depth-wise conv, channels_last | `_kernel_fwd`, stride 0 |
| homogeneous dynamic (kernel per instance) | compiled shift-and-accumulate | `_kernel_fwd`, sample stride |
| inhomogeneous dynamic, locally connected | native loops (sliding.c); compiled if large | `_position_fwd` |
| I-D-DW conv, one channel per group | weights never materialised (predicted.py) | `_position_fwd` |
| neighbourhood attention (logits, aggregation) | native loops (sliding.c) | the reference |
| window attention (local, global) | SDPA; training with a learned bias: chunks | SDPA |

`aggregate` and `fused_forward` return None where no fast path applies; the caller then runs the
reference. Every fast path is checked against its reference in tests/test_fast_paths.py.
"""
from __future__ import annotations

import importlib.util

import torch

from ablate.ops.fast import cpu, native, predicted
from ablate.ops.fast.attention import fusable_projection, window_attention

__all__ = ["aggregate", "fused_forward", "triton_available"]

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_pays(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _GPU_DTYPES and triton_available()


def aggregate(layout, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """A fast `layout.aggregate(x, w)`, or None."""
    if layout.kind != "sliding":
        return None
    k = layout.kernel_size
    if _triton_pays(x):
        from ablate.ops.fast import triton_dw  # imported on a GPU only (compiles at first call)

        if w.dim() == 3:
            return triton_dw.kernel_aggregate(x, w, k)
        return triton_dw.position_aggregate(x, w, k)
    n, c, h, wd = x.shape
    if w.dim() == 5 and _native_pays(x):
        g = w.shape[1]
        y = native.aggregate(x.reshape(n, g, c // g, h, wd), w, k)
        if y is not None:
            return y.reshape(n, c, h, wd)
    if not cpu.compile_pays(x):
        return None
    if w.dim() == 3 and w.shape[0] == 1:
        return cpu.depthwise_conv_channels_last(x, w, k)
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


def fused_forward(mixer, x: torch.Tensor, context: torch.Tensor, value_proj=None) -> torch.Tensor | None:
    """The mixer's output without materialising its weights (attention, I-D-DW conv at one channel per
    group), or None."""
    from ablate.ops.sources.attention import NeighbourhoodAttentionWeights, WindowAttentionWeights
    if predicted.applies(mixer.weights, mixer.layout, x):
        values = x if value_proj is None else value_proj(x)
        return predicted.inhomogeneous_sliding(mixer.weights, values, context, mixer.layout)
    if type(mixer.weights) is NeighbourhoodAttentionWeights and _native_pays(x):
        values = x if value_proj is None else value_proj(x)
        w = mixer.weights(context, mixer.layout, correlate=correlate)
        return aggregate(mixer.layout, values, w)
    if type(mixer.weights) is not WindowAttentionWeights or x.dtype == torch.float64:
        return None
    if value_proj is not None and not (context is x and fusable_projection(value_proj, x.shape[1])):
        x, value_proj = value_proj(x), None  # values from their own projection, then as usual
    return window_attention(mixer.weights, x, context, mixer.layout, value_proj)
