"""Native CPU kernels of the per-position sliding operators: `sliding.c`, compiled once per machine.

Inhomogeneous dynamic depth-wise convolution, the static locally connected layer and neighbourhood
attention apply a different K x K kernel at every position. In eager PyTorch that is K*K passes over
the whole map (shift-and-accumulate, ablate/ops/functional.py): each pass reads and writes map-sized
tensors, so at the sizes a CPU trains (micro: 14 x 14 maps, batch 128) the step is bound by memory
traffic, 6-10x slower per FLOP than a depth-wise convolution. `sliding.c` runs the same three passes
(aggregate, its transpose, correlate) as one loop nest each, with every plane in cache.

Why plain C through ctypes rather than a torch C++ extension or torch.compile: it compiles in about a
second with the system compiler (a torch extension spends a minute on its headers; inductor tens of
seconds per shape, again for every batch size), and it has no shape to specialise on. The library is
built into ~/.cache/ablate/kernels (ABLATE_KERNEL_CACHE) under a name that hashes the source, the
flags and the CPU (it is built with -march=native), so a machine builds it once and a cluster node
with another CPU builds its own. Where no C compiler is found, or the build fails, `available()` is
False (one log line) and the callers run the eager reference. Outputs equal the reference's up to
float rounding (the sums run in another order); tests/test_fast_paths.py checks forward and both
gradients against it and gradchecks the kernels in float64.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["available", "library_path", "aggregate", "correlate", "DTYPES"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sliding.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_FUNCTIONS = ("aggregate", "scatter", "correlate")

_library: ctypes.CDLL | None = None
_failed = False


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join(lines) + platform.machine()


def library_path() -> Path:
    """Where this machine's build of the kernels lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_tag().encode()).hexdigest()
    cache = Path(os.environ.get("ABLATE_KERNEL_CACHE", Path.home() / ".cache/ablate/kernels"))
    return cache / f"sliding-{key[:16]}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, renamed: never half a file
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(built, target)
    log.info("ablate: built the native sliding kernels into %s", target)


def _load() -> ctypes.CDLL | None:
    global _library, _failed
    if _library is not None or _failed:
        return _library
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        library = ctypes.CDLL(str(path))
        # 3 tensors; N, G, C, H, W, K; the 5 strides of the weights (or correlate's output); threads
        signature = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 11 + [ctypes.c_int]
        for suffix in DTYPES.values():
            for name in _FUNCTIONS:
                function = getattr(library, f"ablate_{name}_{suffix}")
                function.argtypes, function.restype = signature, None
            function = getattr(library, f"ablate_aggregate_backward_{suffix}")  # 5 tensors
            function.argtypes, function.restype = [ctypes.c_void_p] * 2 + signature, None
        _library = library
    except Exception as err:  # noqa: BLE001  any build or load failure: the eager reference runs
        _failed = True
        log.warning("ablate: native sliding kernels unavailable (%s: %s); per-position sliding operators "
                    "run the slower eager form", type(err).__name__, str(err).splitlines()[0][:300])
    return _library


@torch.compiler.assume_constant_result  # compiled callers take the answer, not the build's file reads
def available() -> bool:
    """Whether the kernels are built and loaded (building them on first call)."""
    return _load() is not None


def _call(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, shape: tuple[int, ...],
          k: int, strided: torch.Tensor) -> torch.Tensor:
    """Run one kernel; `strided` is the operand read or written through its strides (the weights,
    or correlate's output): a batch of 1 gets stride 0, so one weight set serves the whole batch."""
    n, g, c, h, w = shape
    function = getattr(_load(), f"ablate_{name}_{DTYPES[a.dtype]}")
    function(a.data_ptr(), b.data_ptr(), out.data_ptr(), n, g, c, h, w, k, *_strides(strided),
             torch.get_num_threads())
    return out


def _strides(t: torch.Tensor) -> list[int]:
    """The kernels' view of a weight-shaped tensor: its strides, batch stride 0 for a batch of 1."""
    strides = list(t.stride())
    if t.shape[0] == 1:
        strides[0] = 0
    return strides


def _dense(w: torch.Tensor) -> torch.Tensor:
    """w as it is when its layout is dense (contiguous or position-major: the channels_last output of
    the convolution that predicts it), else a contiguous copy."""
    position_major = w.permute(0, 3, 4, 1, 2).is_contiguous()
    return w if w.is_contiguous() or position_major else w.contiguous()


def _like(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of `shape` in w's layout: a gradient the predicting convolution takes as it is."""
    if w.permute(0, 3, 4, 1, 2).is_contiguous() and not w.is_contiguous():
        n, g, t, h, wd = shape
        return w.new_empty((n, h, wd, g, t)).permute(0, 3, 4, 1, 2)
    return w.new_empty(shape)


# The kernels' grid (sliding.c): rows of W + 2p values. An operand read (or written) at shifted
# positions is padded by p on every side plus one spare row, so the last taps' runs stay inside it;
# the other operands are padded on the right only.
def _pad(t: torch.Tensor, k: int) -> torch.Tensor:
    p = k // 2
    return F.pad(t, (p, p, p, p + 1)).contiguous()


def _pad_right(t: torch.Tensor, k: int) -> torch.Tensor:
    return F.pad(t, (0, 2 * (k // 2))).contiguous()


def _aggregate(xp: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    n, g, c, hp, wp = xp.shape
    p = k // 2
    shape = (n, g, c, hp - 2 * p - 1, wp - 2 * p)
    return _call("aggregate", xp, w, xp.new_empty(shape), shape, k, w)


def _padded_grad(gy: torch.Tensor, k: int) -> torch.Tensor:
    """The gradient of a padded input, (N, G, C, H + 2p + 1, W + 2p); the caller crops it."""
    n, g, c, h, wd = gy.shape
    p = k // 2
    return gy.new_empty((n, g, c, h + 2 * p + 1, wd + 2 * p))


def _crop(gxp: torch.Tensor, k: int) -> torch.Tensor:
    p = k // 2
    return gxp[..., p: gxp.shape[-2] - p - 1, p: gxp.shape[-1] - p]


# The kernels as PyTorch operators (torch.library): `torch.compile` keeps each one a single opaque
# call with the output shapes its fake implementation gives, where a ctypes call inside an autograd
# Function broke the graph at every layer (three presets then failed to compile). Their gradients are
# operators too, so autograd, compile and double backward all see the same kernels.
@torch.library.custom_op("ablate::native_aggregate", mutates_args=())
def _aggregate_op(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    return _aggregate(_pad(x, k), w, k)


@_aggregate_op.register_fake
def _(x, w, k):
    return x.new_empty(x.shape)


@torch.library.custom_op("ablate::native_scatter", mutates_args=())
def _scatter_op(gy: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """The transpose of aggregate in x."""
    gxp = _padded_grad(gy, k)
    _call("scatter", _pad_right(gy, k), w, gxp, gy.shape, k, w)
    return _crop(gxp, k).contiguous()


@_scatter_op.register_fake
def _(gy, w, k):
    return gy.new_empty(gy.shape)


@torch.library.custom_op("ablate::native_correlate", mutates_args=())
def _correlate_op(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (N, G, K*K, H, W) of a against b shifted."""
    n, g, c, h, w = a.shape
    out = a.new_empty((n, g, k * k, h, w))
    return _call("correlate", _pad_right(a, k), _pad(b, k), out, a.shape, k, out)


@_correlate_op.register_fake
def _(a, b, k):
    n, g, _, h, w = a.shape
    return a.new_empty((n, g, k * k, h, w))


@torch.library.custom_op("ablate::native_weight_grad", mutates_args=())
def _weight_grad_op(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """aggregate's gradient in w, in w's layout (summed over the batch for weights shared over it)."""
    out = _like(w, tuple(w.shape))
    return _call("correlate", _pad_right(gy, k), _pad(x, k), out, gy.shape, k, out)


@_weight_grad_op.register_fake
def _(gy, x, w, k):
    return _like(w, tuple(w.shape))


@torch.library.custom_op("ablate::native_aggregate_backward", mutates_args=())
def _aggregate_backward_op(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gw) of aggregate in one pass over gy (gw summed over the batch for shared weights)."""
    n, g, c, h, wd = gy.shape
    gxp, gw = _padded_grad(gy, k), _like(w, tuple(w.shape))
    gyp, xp = _pad_right(gy, k), _pad(x, k)  # held here: the kernel reads their memory
    function = getattr(_load(), f"ablate_aggregate_backward_{DTYPES[gy.dtype]}")
    function(gyp.data_ptr(), xp.data_ptr(), w.data_ptr(), gxp.data_ptr(), gw.data_ptr(),
             n, g, c, h, wd, k, *_strides(w), torch.get_num_threads())
    return _crop(gxp, k).contiguous(), gw


@_aggregate_backward_op.register_fake
def _(gy, x, w, k):
    return gy.new_empty(gy.shape), _like(w, tuple(w.shape))


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.k = inputs[2]


def _aggregate_grad(ctx, gy):
    x, w = ctx.saved_tensors
    k, gy = ctx.k, gy.contiguous()
    if all(ctx.needs_input_grad[:2]):
        gx, gw = _aggregate_backward_op(gy, x, w, k)
        return gx, gw, None
    gx = _scatter_op(gy, w, k) if ctx.needs_input_grad[0] else None
    gw = _weight_grad_op(gy, x, w, k) if ctx.needs_input_grad[1] else None
    return gx, gw, None


def _correlate_grad(ctx, gl):
    a, b = ctx.saved_tensors
    k, gl = ctx.k, gl.contiguous()
    ga = _aggregate_op(b, gl, k) if ctx.needs_input_grad[0] else None
    gb = _scatter_op(a, gl, k) if ctx.needs_input_grad[1] else None
    return ga, gb, None


# The gradients' own gradients (double backward: a gradient penalty, a Hessian-vector product). All
# three are bilinear forms of aggregate y = A(x, w): scatter S(gy, w) is its transpose in x and
# weight_grad Wg(gy, x) its gradient in w, so <S(gy, w), u> = <A(u, w), gy> = <Wg(gy, u), w>, and
# each derivative is another of the same kernels.
def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.k = inputs[-1]


def _scatter_grad(ctx, ggx):
    gy, w = ctx.saved_tensors
    k, ggx = ctx.k, ggx.contiguous()
    ggy = _aggregate_op(ggx, w, k) if ctx.needs_input_grad[0] else None
    gw = _weight_grad_op(gy, ggx, w, k) if ctx.needs_input_grad[1] else None
    return ggy, gw, None


def _weight_grad_grad(ctx, ggw):
    gy, x, w = ctx.saved_tensors
    k, ggw = ctx.k, _dense(ggw)
    ggy = _aggregate_op(x, ggw, k) if ctx.needs_input_grad[0] else None
    gx = _scatter_op(gy, ggw, k) if ctx.needs_input_grad[1] else None
    return ggy, gx, None, None  # w gives the gradient's layout only


def _aggregate_backward_grad(ctx, ggx, ggw):
    gy, x, w = ctx.saved_tensors
    k = ctx.k
    ggx = None if ggx is None else ggx.contiguous()
    ggw = None if ggw is None else _dense(ggw)
    ggy = gx = gw = None
    if ctx.needs_input_grad[0]:
        parts = ([] if ggx is None else [_aggregate_op(ggx, w, k)]) + \
                ([] if ggw is None else [_aggregate_op(x, ggw, k)])
        ggy = sum(parts[1:], parts[0]) if parts else None
    if ctx.needs_input_grad[1] and ggw is not None:
        gx = _scatter_op(gy, ggw, k)
    if ctx.needs_input_grad[2] and ggx is not None:
        gw = _weight_grad_op(gy, ggx, w, k)
    return ggy, gx, gw, None


_aggregate_op.register_autograd(_aggregate_grad, setup_context=_save_operands)
_correlate_op.register_autograd(_correlate_grad, setup_context=_save_operands)
_scatter_op.register_autograd(_scatter_grad, setup_context=_save_all)
_weight_grad_op.register_autograd(_weight_grad_grad, setup_context=_save_all)
_aggregate_backward_op.register_autograd(_aggregate_backward_grad, setup_context=_save_all)


def _usable(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in DTYPES
            and all(t.device == first.device and t.dtype == first.dtype for t in tensors) and available())


def aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor | None:
    """x (N, G, Cg, H, W), w (N|1, G, K*K, H, W) -> y (N, G, Cg, H, W), as `sliding_aggregate`;
    None where the kernels do not apply (not the CPU, another dtype, no build)."""
    if not _usable(x, w):
        return None
    n, g, _, h, wd = x.shape
    # the kernels read w by pointer at x's positions: a w of another map would be read past its end
    if w.shape[0] not in (1, n) or tuple(w.shape[1:]) != (g, kernel_size * kernel_size, h, wd):
        batch = f"{n} or 1" if n > 1 else "1"
        raise ValueError(f"aggregate: weights {tuple(w.shape)} do not fit x {tuple(x.shape)} and kernel "
                         f"{kernel_size}: expected ({batch}, {g}, {kernel_size * kernel_size}, {h}, {wd})")
    return _aggregate_op(x.contiguous(), _dense(w), kernel_size)


def correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int) -> torch.Tensor | None:
    """a, b (N, G, Cg, H, W) -> logits (N, G, K*K, H, W), as `sliding_correlate`; None where the
    kernels do not apply."""
    if not _usable(a, b):
        return None
    if a.shape != b.shape:  # read by pointer at the same positions
        raise ValueError(f"correlate: {tuple(a.shape)} and {tuple(b.shape)} differ")
    return _correlate_op(a.contiguous(), b.contiguous(), kernel_size)
