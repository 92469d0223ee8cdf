"""CPU fast paths of the sliding (depth-wise family) operators.

- static kernel (depth-wise convolution): oneDNN's depth-wise convolution in channels_last. PyTorch's
  NCHW depth-wise convolution falls back to a generic kernel whose backward is 50x slower on a CPU.
- homogeneous (a kernel per instance) and inhomogeneous (a kernel per instance and position): the
  shift-and-accumulate form (one term per neighbour offset) compiled by `torch.compile`. Inductor fuses
  the K*K terms into one vectorised loop nest per pass, so every pass reads each operand once, where
  the batch-folded grouped convolution runs the slow generic kernel and the unfold form writes K*K
  copies of the map. Forward, input gradient and weight gradient are three compiled functions tied
  by one autograd.Function (the gradient of one pass is another pass of the same family).

Compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/ablate/inductor), so a
shape compiles once per machine. Where compilation fails (no C++ compiler, an unsupported platform)
the same functions run eagerly, after one log line.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["CompiledForm", "kernel_aggregate", "position_aggregate",
           "compile_pays", "MIN_COMPILED_ELEMENTS"]

log = logging.getLogger(__name__)

# Below this many input elements a compiled kernel does not pay back its compile time (tens of
# seconds per shape and pass, again for each batch size a run meets): micro models on Fashion-MNIST
# (128 x 32 x 14 x 14 = 0.8M at stage 1) train for CPU-minutes and stay on the eager reference;
# tiny at 224 px (32 x 96 x 56 x 56 = 9.6M at stage 1) compiles once and gains 2.7-12x per step.
MIN_COMPILED_ELEMENTS = 1 << 22
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compile_pays(x: torch.Tensor) -> bool:
    """Whether the compiled CPU form is the fast path for this input (float64 checks stay exact)."""
    return x.device.type == "cpu" and x.dtype in _FAST_DTYPES and x.numel() >= MIN_COMPILED_ELEMENTS


def _use_disk_cache() -> None:
    cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache/ablate/inductor"))
    Path(cache).mkdir(parents=True, exist_ok=True)
    # One compiled graph per (stage shape, batch size, pass): a tiny model alone has a dozen; the
    # default limit of 8 per function would silently send the rest to the slow eager form.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 256)


class CompiledForm:
    """A function compiled on first use (shapes specialised), or run eagerly if compiling fails."""

    def __init__(self, fn: Callable):
        self.fn, self._compiled, self.failed = fn, None, False
        self.__name__ = fn.__name__

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # inside a compiled model: its compiler takes this code too
            return self.fn(*args)
        if not self.failed:
            try:
                if self._compiled is None:
                    _use_disk_cache()
                    self._compiled = torch.compile(self.fn, dynamic=False)
                return self._compiled(*args)
            except Exception as err:  # noqa: BLE001 (any compiler failure: run the same code eagerly)
                self.failed = True
                log.warning("ablate: torch.compile of %s failed (%s: %s); running it eagerly",
                            self.fn.__name__, type(err).__name__, str(err).splitlines()[0][:200])
        return self.fn(*args)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32 whatever the storage (bf16, fp16)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# -- the shift-and-accumulate forms (d_k: the k-th offset of the K x K neighbourhood, row-major) --
def _position_forward(xp: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """y[n,g,c,i] = sum_k w[n,g,k,i] x[n,g,c,i+d_k]; xp is x zero padded by K//2."""
    h, wd = w.shape[-2:]
    xp, w = _acc(xp), _acc(w)
    y = None
    for t in range(k * k):
        dy, dx = divmod(t, k)
        term = w[:, :, t, None] * xp[..., dy: dy + h, dx: dx + wd]
        y = term if y is None else y + term
    return y


def _position_input_grad(gp: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """gx[n,g,c,j] = sum_k w[n,g,k,j-d_k] gy[n,g,c,j-d_k]; gp is gy zero padded by K//2."""
    h, wd = w.shape[-2:]
    p = k // 2
    wp = F.pad(_acc(w), (p, p, p, p))  # fused into the loads by inductor: no padded copy of w
    gp = _acc(gp)
    out = None
    for t in range(k * k):
        dy, dx = divmod(t, k)
        r, c = 2 * p - dy, 2 * p - dx
        term = wp[:, :, t, None, r: r + h, c: c + wd] * gp[..., r: r + h, c: c + wd]
        out = term if out is None else out + term
    return out


def _position_weight_grad(gy: torch.Tensor, xp: torch.Tensor, k: int) -> torch.Tensor:
    """gw[n,g,k,i] = sum_c gy[n,g,c,i] x[n,g,c,i+d_k]. The sum over the few channels of a group is
    unrolled: inductor then writes all K*K outputs from one loop that loads gy and x once."""
    h, wd = gy.shape[-2:]
    gy, xp = _acc(gy), _acc(xp)
    cg = gy.shape[2]
    outs = []
    for t in range(k * k):
        dy, dx = divmod(t, k)
        s = xp[..., dy: dy + h, dx: dx + wd]
        if cg <= 8:
            acc = gy[:, :, 0] * s[:, :, 0]
            for c in range(1, cg):
                acc = acc + gy[:, :, c] * s[:, :, c]
        else:
            acc = (gy * s).sum(2)
        outs.append(acc)
    return torch.stack(outs, 2)


def _kernel_forward(xp: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """y[n,c,i] = sum_k w[n,c,k] x[n,c,i+d_k] (a depth-wise convolution with a kernel per instance)."""
    h, wd = xp.shape[-2] - 2 * (k // 2), xp.shape[-1] - 2 * (k // 2)
    xp, w = _acc(xp), _acc(w)
    y = None
    for t in range(k * k):
        dy, dx = divmod(t, k)
        term = w[:, :, t, None, None] * xp[..., dy: dy + h, dx: dx + wd]
        y = term if y is None else y + term
    return y


def _kernel_weight_grad(gy: torch.Tensor, xp: torch.Tensor, k: int) -> torch.Tensor:
    """gw[n,c,k] = sum_i gy[n,c,i] x[n,c,i+d_k]: K*K reductions over the map, fused in one pass."""
    h, wd = gy.shape[-2:]
    gy, xp = _acc(gy), _acc(xp)
    return torch.stack([(gy * xp[..., dy: dy + h, dx: dx + wd]).sum((-1, -2))
                        for dy in range(k) for dx in range(k)], -1)


position_forward = CompiledForm(_position_forward)
position_input_grad = CompiledForm(_position_input_grad)
position_weight_grad = CompiledForm(_position_weight_grad)
kernel_forward = CompiledForm(_kernel_forward)
kernel_weight_grad = CompiledForm(_kernel_weight_grad)


def _pad(t: torch.Tensor, p: int) -> torch.Tensor:
    return F.pad(t, (p, p, p, p))


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad.sum(0, keepdim=True) if shape[0] == 1 and grad.shape[0] != 1 else grad


class _Form(NamedTuple):
    """The three passes of one aggregation, on zero-padded maps (xp: x padded by K // 2)."""

    forward: Callable  # (xp, w, k) -> y
    input_grad: Callable  # (gy padded, w, k) -> gx
    weight_grad: Callable  # (gy, xp, k) -> gw


def _flipped_kernel_forward(gyp: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    return kernel_forward(gyp, w.flip(-1), k)  # the transpose of a convolution: the flipped kernel


_POSITION = _Form(position_forward, position_input_grad, position_weight_grad)
_KERNEL = _Form(kernel_forward, _flipped_kernel_forward, kernel_weight_grad)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, k, form):
        # x itself is saved and padded again in backward: a padded copy made here has no graph back
        # to x, so the weight gradient's own gradient in x (double backward) would be silently zero
        ctx.save_for_backward(x, w)
        ctx.k, ctx.form, ctx.x_shape = k, form, x.shape
        return form.forward(_pad(x, k // 2), w, k).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        k, form = ctx.k, ctx.form
        gy = gy.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _sum_to(form.input_grad(_pad(gy, k // 2), w, k), ctx.x_shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = _sum_to(form.weight_grad(gy, _pad(x, k // 2), k), w.shape).to(w.dtype)
        return gx, gw, None, None


def position_aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, G, Cg, H, W), w (N|1, G, K*K, H, W) -> (N, G, Cg, H, W); as `sliding_aggregate`."""
    return _Aggregate.apply(x.contiguous(), w.contiguous(), kernel_size, _POSITION)


def kernel_aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, C, H, W), w (N|1, G, K*K) -> (N, C, H, W): a depth-wise convolution with a kernel per
    instance (and group), without folding the batch into the channels."""
    c = x.shape[1]
    wc = w.repeat_interleave(c // w.shape[1], dim=1) if w.shape[1] != c else w
    return _Aggregate.apply(x.contiguous(), wc.contiguous(), kernel_size, _KERNEL)
