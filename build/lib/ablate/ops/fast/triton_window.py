"""Triton kernels (GPU) of window aggregation, NHWC: forward and both gradients, no window copies.

`WindowLayout.aggregate` (local MLP, window convolution, per-window and dynamic window weights)
pads, rolls and cuts the map into windows, applies each window's (T, T) matrices with an einsum and
undoes the cut and the roll: on an NCHW or channels_last map each step is a copy of the map, and
autograd's backward repeats them. On a GPU those copies, not the products, bound the operator. Here
a program owns one window and a block of one group's channels: it computes where the window's T tokens lie on
the map (the pad and the cyclic shift as address arithmetic, positions on the padding read zeros and
write nothing), loads them, multiplies by the window's (T, T) weights on the tensor cores and
stores the result where the tokens came from: the map is read once and written once per pass.

- forward: y[n, pos(i)] = sum_j w[n, win, g, i, j] x[n, pos(j)], for the channels of group g;
- input gradient: the same kernel with the weights transposed (a token belongs to one window);
- weight gradient: sum over the windows and instances sharing a weight of gy(i) x(j)^T, a program
  per weight matrix and chunk of its windows; the chunks' float32 partial sums are added by PyTorch
  afterwards (deterministic, no atomics).

Weights are (N|1, nW|1, G, T, T), a size-1 dim being shared (stride 0 for the kernels); the shift's
region mask is applied to them before the kernels, as the reference does. T must fit one tile
(`MAX_TOKENS`); bigger windows (global layouts of big maps) are one large GEMM for the reference.

On the CPU these kernels run through Triton's interpreter (TRITON_INTERPRET=1 before importing
this module); the selfcheck does that on small shapes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ablate.ops.fast.triton_dw import _programs_wanted, _shared_chunks

__all__ = ["window_aggregate", "MAX_TOKENS"]

# A window's (T, T) matrix is one tile in registers: windows up to 8 x 8 tokens (Swin's 7 x 7: 49, a
# 64-token tile). The routes send bigger windows to the reference (`routes.MAX_WINDOW_TOKENS`).
MAX_TOKENS = 64


@triton.jit
def _window_tokens(win, H, W, HP, WP, GW, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
                   SW: tl.constexpr, TP: tl.constexpr):
    """Map rows and columns of window `win`'s tokens (raster order inside the window), and which
    lie on the map. The windows tile the map padded to HP x WP and rolled back by the shift, so a
    window's token (r, c) of the rolled map is position ((r + SH) mod HP, (c + SW) mod WP)."""
    t = tl.arange(0, TP)
    r = (win // GW) * WH + t // WW
    c = (win % GW) * WW + t % WW
    h = (r + SH) % HP
    w = (c + SW) % WP
    return h, w, (t < WH * WW) & (h < H) & (w < W)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32: float32 operands exactly (IEEE, not TF32: the reference's
    einsum); half-precision ones on the tensor cores, or upcast first (UPCAST: Triton's interpreter
    multiplies bfloat16's bit patterns, triton-lang/triton#11584)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _window_fwd(x_ptr, w_ptr, y_ptr, NW, H, W, HP, WP, GW, CG,
                sxn, sxc, sxh, sxw, swn, sww, swg, swi, swj, syn, syc, syh, syw,
                WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                TP: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # y[n, pos(i), c] = sum_j w[n, win, g, i, j] x[n, pos(j), c] over window `win`'s tokens, for one
    # block of BLOCK_C of group g's CG channels; with the weights' i and j strides swapped, the input
    # gradient.
    n = (tl.program_id(0) // NW).to(tl.int64)
    win = tl.program_id(0) % NW
    blocks = tl.cdiv(CG, BLOCK_C)
    g = tl.program_id(1) // blocks
    c = (tl.program_id(1) % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    h, w, on_map = _window_tokens(win, H, W, HP, WP, GW, WH, WW, SH, SW, TP)
    ch = g * CG + c
    mask = on_map[:, None] & (c < CG)[None, :]
    xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + ch[None, :] * sxc, mask=mask, other=0.0)
    t = tl.arange(0, TP)
    inside = t < WH * WW
    wv = tl.load(w_ptr + n * swn + win * sww + g * swg + t[:, None] * swi + t[None, :] * swj,
                 mask=inside[:, None] & inside[None, :], other=0.0)
    acc = _dot(wv, xv, IEEE, UPCAST)
    tl.store(y_ptr + n * syn + (h * syh + w * syw)[:, None] + ch[None, :] * syc,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_wgrad(x_ptr, g_ptr, gw_ptr, NW, PAIRS, PER, H, W, HP, WP, GW, CG, WWIN, G,
                  sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, spk, spe, spi, spj,
                  PER_INSTANCE: tl.constexpr, PER_WINDOW: tl.constexpr,
                  WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  TP: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # partial[chunk, e, i, j] = sum over this chunk's (instance, window) pairs of weight matrix e of
    # sum_c gy[n, pos(i), c] x[n, pos(j), c] (the group's channels in blocks of BLOCK_C). Matrix e =
    # (instance, window, group) of the weights; its pairs run over the instances unless PER_INSTANCE,
    # over the windows unless PER_WINDOW.
    e = tl.program_id(0)
    chunk = tl.program_id(1)
    g = e % G
    ew = (e // G) % WWIN
    en = e // (G * WWIN)
    acc = tl.zeros((TP, TP), dtype=tl.float32)
    first = chunk * PER
    count = tl.minimum(PER, PAIRS - first)
    # a while loop, not range(count): see triton_dw._position_wgrad (Triton's interpreter)
    k = 0
    while k < count:
        p = first + k
        if PER_WINDOW:
            win = ew
            rest = p
        else:
            win = p % NW
            rest = p // NW
        if PER_INSTANCE:
            n = en.to(tl.int64)
        else:
            n = rest.to(tl.int64)
        h, w, on_map = _window_tokens(win, H, W, HP, WP, GW, WH, WW, SH, SW, TP)
        start = 0
        while start < CG:
            c = start + tl.arange(0, BLOCK_C)
            ch = g * CG + c
            mask = on_map[:, None] & (c < CG)[None, :]
            xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + ch[None, :] * sxc, mask=mask,
                         other=0.0)
            gv = tl.load(g_ptr + n * sgn + (h * sgh + w * sgw)[:, None] + ch[None, :] * sgc, mask=mask,
                         other=0.0)
            acc += _dot(gv, tl.trans(xv), IEEE, UPCAST)
            start += BLOCK_C
        k += 1
    t = tl.arange(0, TP)
    inside = t < WH * WW
    tl.store(gw_ptr + chunk.to(tl.int64) * spk + e * spe + t[:, None] * spi + t[None, :] * spj, acc,
             mask=inside[:, None] & inside[None, :])


def _geometry(x: torch.Tensor, window: list[int]):
    """(H, W, HP, WP, grid width, windows) of a map cut into `window` = [wh, ww, sh, sw] windows."""
    h, wd = x.shape[2:]
    wh, ww = window[:2]
    hp, wp = h + (-h) % wh, wd + (-wd) % ww
    return h, wd, hp, wp, wp // ww, (hp // wh) * (wp // ww)


# The most channels of a group one program's tile holds; wider groups (a map-sized token MLP's 768)
# are cut into blocks of it. Float32's exact products are CUDA-core FMAs with their operands in
# registers: compiled for sm_90, a 64-token window's 64-channel tile took 255 registers and spilled
# 504 bytes a thread (5 KB in another specialisation); 32 channels took 96 and none
# (`python -m ablate.gpu_compile`). Half precision's products run on the tensor cores: 64 fit.
MAX_BLOCK_C = {torch.float32: 32, torch.bfloat16: 64, torch.float16: 64}


def _tiles(w_shape, channels: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(TP, BLOCK_C, CG): the token tile (T padded to a power of two; tl.dot wants at least 16), the
    channel tile and the channels of one group."""
    t, groups = w_shape[-1], w_shape[2]
    cg = channels // groups
    block_c = min(MAX_BLOCK_C[dtype], max(16, triton.next_power_of_2(cg)))
    return max(16, triton.next_power_of_2(t)), block_c, cg


def dot_precision(dtype: torch.dtype) -> dict:
    """`_dot`'s constants for operands of `dtype`: float32 exactly (IEEE); in Triton's interpreter
    everything upcast and exact (its bfloat16 dot is wrong, see `_dot`)."""
    upcast = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's own test of the interpreter
    return dict(IEEE=dtype == torch.float32 or upcast, UPCAST=upcast)


def _constants(window: list[int], x: torch.Tensor) -> dict:
    wh, ww, sh, sw = window
    return dict(WH=wh, WW=ww, SH=sh, SW=sw, **dot_precision(x.dtype))


def _strides(t: torch.Tensor):
    """An (N, C, H, W) tensor's strides in the kernels' order: n, c, h, w."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _forward(x: torch.Tensor, w: torch.Tensor, window: list[int], transpose: bool = False) -> torch.Tensor:
    """x (N, C, H, W) any strides, w (N|1, nW|1, G, T, T) -> (N, C, H, W) channels_last."""
    n, c = x.shape[:2]
    h, wd, hp, wp, gw, windows = _geometry(x, window)
    tp, block_c, cg = _tiles(w.shape, c, x.dtype)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    swn = 0 if w.shape[0] == 1 else w.stride(0)
    sww = 0 if w.shape[1] == 1 else w.stride(1)
    swi, swj = (w.stride(4), w.stride(3)) if transpose else (w.stride(3), w.stride(4))
    _window_fwd[(n * windows, w.shape[2] * triton.cdiv(cg, block_c))](
        x, w, y, windows, h, wd, hp, wp, gw, cg, *_strides(x), swn, sww, w.stride(2), swi, swj, *_strides(y),
        TP=tp, BLOCK_C=block_c, **_constants(window, x))
    return y


def _weight_grad(x: torch.Tensor, gy: torch.Tensor, w_shape, window: list[int], dtype) -> torch.Tensor:
    """The weights' gradient, shaped as w (N|1, nW|1, G, T, T): summed over what shares a matrix."""
    n, c = x.shape[:2]
    h, wd, hp, wp, gw, windows = _geometry(x, window)
    tp, block_c, cg = _tiles(w_shape, c, x.dtype)
    per_instance, per_window = w_shape[0] > 1, w_shape[1] > 1
    matrices = w_shape[0] * w_shape[1] * w_shape[2]
    pairs = (1 if per_instance else n) * (1 if per_window else windows)
    per = _shared_chunks(pairs, matrices, _programs_wanted(x.device))
    chunks = triton.cdiv(pairs, per)
    t = w_shape[-1]
    partial = torch.empty((chunks, matrices, t, t), dtype=torch.float32, device=x.device)
    _window_wgrad[(matrices, chunks)](
        x, gy, partial, windows, pairs, per, h, wd, hp, wp, gw, cg, w_shape[1], w_shape[2],
        *_strides(x), *_strides(gy), *partial.stride(), PER_INSTANCE=per_instance, PER_WINDOW=per_window,
        TP=tp, BLOCK_C=block_c, **_constants(window, x))
    return partial.sum(0).view(w_shape).to(dtype)


# The passes as PyTorch operators (torch.library), as triton_dw's: `torch.compile` keeps each a single
# opaque call. `window`: [window height, width, shift rows, shift columns].
@torch.library.custom_op("ablate::triton_window_aggregate", mutates_args=())
def _window_op(x: torch.Tensor, w: torch.Tensor, window: list[int]) -> torch.Tensor:
    return _forward(x, w, window)


@torch.library.custom_op("ablate::triton_window_input_grad", mutates_args=())
def _window_input_grad_op(gy: torch.Tensor, w: torch.Tensor, window: list[int]) -> torch.Tensor:
    return _forward(gy, w, window, transpose=True)


@torch.library.custom_op("ablate::triton_window_weight_grad", mutates_args=())
def _window_weight_grad_op(x: torch.Tensor, gy: torch.Tensor, w: torch.Tensor,
                           window: list[int]) -> torch.Tensor:
    return _weight_grad(x, gy, w.shape, window, w.dtype)


@_window_op.register_fake
def _(x, w, window):
    return torch.empty_like(x, memory_format=torch.channels_last)


@_window_input_grad_op.register_fake
def _(gy, w, window):
    return torch.empty_like(gy, memory_format=torch.channels_last)


@_window_weight_grad_op.register_fake
def _(x, gy, w, window):
    return w.new_empty(w.shape)


def _save(ctx, inputs, output):
    x, w, window = inputs
    ctx.save_for_backward(x, w)
    ctx.window = window


def _grad(ctx, gy):
    x, w = ctx.saved_tensors
    gx = _window_input_grad_op(gy, w, ctx.window) if ctx.needs_input_grad[0] else None
    gw = _window_weight_grad_op(x, gy, w, ctx.window) if ctx.needs_input_grad[1] else None
    return gx, gw, None


_window_op.register_autograd(_grad, setup_context=_save)


def window_aggregate(layout, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`layout.aggregate(x, w)` of a `WindowLayout` (T <= MAX_TOKENS): x (N, C, H, W) any strides,
    w (N|1, nW|1, G, T, T) -> (N, C, H, W) channels_last, in x's dtype (the weights are cast to it,
    as autocast's einsum casts them)."""
    if layout.tokens > MAX_TOKENS:
        raise ValueError(f"a window of {layout.tokens} tokens: the kernels take at most {MAX_TOKENS}")
    if layout.same_region is not None:  # a shifted window joins regions that are not neighbours
        w = w * layout.same_region[:, None].to(w.dtype)
    window = [*layout.window, *layout.shift]
    return _window_op(x, w.to(x.dtype).contiguous(), window)
