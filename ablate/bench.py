"""`python -m ablate.bench`: the operators and models, fast paths against what a user would use instead.

    python -m ablate.bench                      # CPU: operators at tiny (batch 32) and micro; models
    python -m ablate.bench --quick              # a smoke run: small batch, few rounds
    python -m ablate.bench --device cuda        # GPU: batch 128, bandwidth against a measured copy
    python -m ablate.bench --section ops --sizes tiny --stages 1 --ops idynamic_dwconv

Operators run at the per-stage shapes of a model size. Every operator has candidates: its baseline
(what a user would write instead: nn.Conv2d depth-wise, the batch-folded grouped convolution of the
official DWNet, unfold-multiply-sum as involution's naive form, timm's Swin WindowAttention) and
ablate's two backends, `reference` and `fast`. Forward, input gradient and weight gradient are timed
separately (and forward plus both gradients, `fwd_bwd`), candidates interleaved in rounds inside one
process on the same tensors; the table holds medians over rounds, the speedup over the baseline
(baseline time / candidate time) and the peak memory of one forward plus backward. On a GPU, also
the bytes every pass must move over its time, and that bandwidth as a fraction of a measured
device-to-device copy.

Models: train and inference samples/s of every preset at `micro` and `tiny` beside timm's
`swin_tiny`, under timm's benchmark column names. `--section profile`: where each model's eager train
step spends its time, by PyTorch operator (torch.profiler). Output: CSV, JSON and Markdown under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import ablate  # noqa: F401  (registers the operators)
from ablate.cli import run_cli
from ablate.distributed import checked_device
from ablate.errors import at_least
from ablate.models.backbone import SIZES, stage_geometry
from ablate.ops.fast import routes
from ablate.ops.mixer import SpatialMixer, apply_backend
from ablate.space.presets import PRESETS

__all__ = ["OPERATORS", "main", "run"]

PASSES = ("fwd", "bwd_input", "bwd_weight", "fwd_bwd")


# -- measurement ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS (malloc_trim), so that a call's allocations fault
    pages in again and its peak shows in the resident set's high-water mark; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the start of one call: the CUDA allocator's, or on Linux the resident set's
    high-water mark (reset through /proc/self/clear_refs), else None."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()  # else re-used heap pages never show in the resident set
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = self._status("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            high = self._status("VmHWM")
            self.peak = None if high is None else max(0, high - self.start)


@dataclass
class Candidate:
    """One implementation: `setup()` -> (forward callable, inputs, weights) on fresh leaf tensors."""

    name: str
    setup: Callable[[], tuple[Callable[[], torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]
    baseline: bool = False
    bytes_moved: dict[str, int] = field(default_factory=dict)
    passes: tuple[str, ...] = PASSES  # ("fwd",) for a forward-only kernel: its backward is not timed


def _time_candidates(cands: Sequence[Candidate], device, rounds: int, warmup: int) -> dict[str, dict]:
    """Medians per pass of every candidate, interleaved in rounds (one call per candidate per round)."""
    states = {}
    for c in cands:
        fn, inputs, weights = c.setup()
        states[c.name] = (fn, inputs, weights)
    times = {c.name: {p: [] for p in c.passes} for c in cands}
    memory = {}

    def grads(fn, wrt, frozen):
        """Time one backward for `wrt` only: the other leaves do not require grad during the forward,
        so a custom backward skips their gradient (as in a frozen layer or the input of a network)."""
        for t in frozen:
            t.requires_grad_(False)
        try:
            y = fn()
            gy = torch.ones_like(y)
            _sync(device)
            t0 = time.perf_counter()
            torch.autograd.grad(y, wrt, gy)
            _sync(device)
            return time.perf_counter() - t0
        finally:
            for t in frozen:
                t.requires_grad_(True)

    def one(cand: Candidate, record: bool):
        fn, inputs, weights = states[cand.name]
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        took = {"fwd": time.perf_counter() - t0}
        if "bwd_input" in cand.passes:
            took["bwd_input"] = grads(fn, inputs, weights)
            took["bwd_weight"] = grads(fn, weights, inputs)
            _sync(device)
            t0 = time.perf_counter()
            y = fn()
            torch.autograd.grad(y, inputs + weights, torch.ones_like(y))
            _sync(device)
            took["fwd_bwd"] = time.perf_counter() - t0
            del y
        if record:
            for p in cand.passes:
                times[cand.name][p].append(took[p])

    for r in range(warmup + rounds):
        for c in cands:
            one(c, record=r >= warmup)
    for c in cands:
        fn, inputs, weights = states[c.name]
        with PeakMemory(device) as peak:
            y = fn()
            if "bwd_input" in c.passes:
                torch.autograd.grad(y, inputs + weights, torch.ones_like(y))
            del y
        memory[c.name] = peak.peak
    return {name: {"median": {p: statistics.median(v) for p, v in t.items()},
                   "min": {p: min(v) for p, v in t.items()}, "peak_bytes": memory[name]}
            for name, t in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, reps: int = 10) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second), the roofline of the passes."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * reps / (time.perf_counter() - t)


# -- operators -----------------------------------------------------------------------------------
def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _dw_family(kind: str, n: int, c: int, h: int, w: int, groups: int, k: int, device, dtype, seed: int):
    """The tensors of one depth-wise family operator with a k x k kernel: x, w (the weights as the
    layout receives them: the kernel's k * k taps in dim 2)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype)
    shape = {"static": (1, c, k * k), "homogeneous": (n, c, k * k),
             "inhomogeneous": (n, groups, k * k, h, w)}[kind]
    wt = (torch.randn(shape, generator=gen) / k).to(device, dtype)
    return x, wt


def _kernel(wt: torch.Tensor) -> int:
    """The kernel size of weights made by `_dw_family`."""
    return math.isqrt(wt.shape[2])


def _layout_candidate(name: str, backend: str, x, wt, device, baseline=False) -> Candidate:
    from ablate.ops import fast
    from ablate.ops.layouts import SlidingLayout

    layout = SlidingLayout(tuple(x.shape[-2:]), _kernel(wt)).to(device)

    def setup():
        xi, wi = _leaf(x), _leaf(wt)
        if backend == "fast":
            def fn():
                y = fast.aggregate(layout, xi, wi)
                return layout.aggregate(xi, wi) if y is None else y
        else:
            def fn():
                return layout.aggregate(xi, wi)
        return fn, [xi], [wi]

    return Candidate(name, setup, baseline)


def _static_candidates(x, wt, device) -> list[Candidate]:
    c, k = x.shape[1], _kernel(wt)

    def conv(memory_format):
        def setup():
            xi = _leaf(x.contiguous(memory_format=memory_format))
            kernel = _leaf(wt[0].reshape(c, 1, k, k))
            return (lambda: F.conv2d(xi, kernel, padding=k // 2, groups=c)), [xi], [kernel]
        return setup

    return [Candidate("nn.Conv2d NCHW", conv(torch.contiguous_format), baseline=True),
            Candidate("nn.Conv2d channels_last", conv(torch.channels_last)),
            _layout_candidate("ablate reference", "reference", x, wt, device),
            _layout_candidate("ablate fast", "fast", x, wt, device), *_triton_kernel_candidate(x, wt, device)]


def _triton_kernel_candidate(x, wt, device) -> list[Candidate]:
    """ablate's Triton kernel-weight kernel (NHWC) on a GPU, timed beside the path the routing takes
    (cuDNN for static weights, the batch-folded conv for per-instance ones), so that the bench shows
    when it would pay."""
    if device.type != "cuda":
        return []
    from ablate.ops.fast import triton_dw

    def setup():
        xi, wi = _leaf(x.contiguous(memory_format=torch.channels_last)), _leaf(wt)
        return (lambda: triton_dw.kernel_aggregate(xi, wi, _kernel(wt))), [xi], [wi]

    return [Candidate("triton kernel-weight NHWC", setup)]


def _homogeneous_candidates(x, wt, device) -> list[Candidate]:
    (n, c, h, w), k = x.shape, _kernel(wt)

    def folded():  # the official DWNet: fold the batch into the channels of one grouped conv
        xi, wi = _leaf(x), _leaf(wt)
        return (lambda: F.conv2d(xi.reshape(1, n * c, h, w), wi.reshape(n * c, 1, k, k), padding=k // 2,
                                 groups=n * c).reshape(n, c, h, w)), [xi], [wi]

    def folded_channels_last():  # the same conv folded into an NHWC map: cuDNN's NHWC kernels
        xi, wi = _leaf(x.contiguous(memory_format=torch.channels_last)), _leaf(wt)
        return (lambda: routes.folded_channels_last(xi, wi, k)), [xi], [wi]

    return [Candidate("batch-folded grouped conv", folded, baseline=True),
            Candidate("batch-folded grouped conv, channels_last", folded_channels_last),
            _layout_candidate("ablate reference", "reference", x, wt, device),
            _layout_candidate("ablate fast", "fast", x, wt, device), *_triton_kernel_candidate(x, wt, device)]


def _inhomogeneous_candidates(x, wt, device) -> list[Candidate]:
    k = _kernel(wt)

    def unfold():  # involution's naive form: unfold the neighbourhoods, multiply, sum
        xi, wi = _leaf(x), _leaf(wt)
        return (lambda: routes.unfold_multiply_sum(xi, wi, k)), [xi], [wi]

    cands = [Candidate("unfold-multiply-sum", unfold, baseline=True),
             _layout_candidate("ablate reference", "reference", x, wt, device),
             _layout_candidate("ablate fast", "fast", x, wt, device)]
    if device.type == "cuda":
        from ablate.ops.fast import triton_dw

        def naive():
            xi, wi = _leaf(x), _leaf(wt)
            return (lambda: triton_dw.naive_position_forward(xi, wi, k)), [xi], [wi]
        cands.append(Candidate("triton one-thread-per-output (fwd only)", naive, passes=("fwd",)))

        def tiled(tile):  # the per-position route's Triton candidates, one per tile
            def setup():
                xi, wi = _leaf(x.contiguous(memory_format=torch.channels_last)), _leaf(wt)
                return (lambda: triton_dw.position_aggregate(xi, wi, k, tile)), [xi], [wi]
            return setup
        cands += [Candidate(f"triton NHWC, {tile} tile", tiled(tile)) for tile in triton_dw.POSITION_TILES]
    return cands


def _attention_candidates(n, c, res, shifted, k, device, dtype, seed) -> list[Candidate]:
    """The attention layer (window k) with its projections: timm's Swin (pad, roll, partition,
    WindowAttention, reverse, roll, crop) against ablate's in_proj, mixer and out_proj of the Swin
    block."""
    from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse

    from ablate.models.blocks import pointwise

    heads = c // 32
    h, w = res
    spec = PRESETS["local_attention"].at_window(k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype)

    def timm_setup():
        mixer = SpatialMixer(spec, c, res, 32, shifted=shifted, backend="reference")
        (ws, _), (shift, _), (hp, wp) = mixer.layout.window, mixer.layout.shift, mixer.layout.padded
        attn = WindowAttention(c, heads, window_size=(ws, ws)).to(device, dtype)
        mask = mixer.layout.same_region
        mask = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, -100.0).to(device, dtype)
        xi = _leaf(x.permute(0, 2, 3, 1).contiguous())

        def fn():
            t = F.pad(xi, (0, 0, 0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else xi
            t = torch.roll(t, (-shift, -shift), (1, 2)) if shift else t
            t = window_partition(t, (ws, ws)).reshape(-1, ws * ws, c)
            t = window_reverse(attn(t, mask=mask).reshape(-1, ws, ws, c), (ws, ws), hp, wp)
            return (torch.roll(t, (shift, shift), (1, 2)) if shift else t)[:, :h, :w]
        return fn, [xi], list(attn.parameters())

    def ours(backend, channels_last=False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def setup():
            mixer = SpatialMixer(spec, c, res, 32, shifted=shifted, backend=backend).to(device, dtype)
            in_proj, out_proj = pointwise(c, c).to(device, dtype), pointwise(c, c).to(device, dtype)
            in_proj, out_proj = in_proj.to(memory_format=fmt), out_proj.to(memory_format=fmt)
            xi = _leaf(x.contiguous(memory_format=fmt))
            params = [*mixer.parameters(), *in_proj.parameters(), *out_proj.parameters()]
            return (lambda: out_proj(mixer(xi, value_proj=in_proj))), [xi], params  # as the Swin block
        return setup

    return [Candidate("timm Swin WindowAttention", timm_setup, baseline=True),
            Candidate("ablate reference", ours("reference")),
            Candidate("ablate fast", ours("fast")),
            Candidate("ablate fast channels_last", ours("fast", channels_last=True))]


def _natten_candidate(n, c, res, k, device, dtype, seed) -> Candidate | None:
    """NATTEN's `na2d` (the field's neighbourhood attention) on q, k, v of the same shapes, where
    `import natten` works. A speed reference, not an output one: NATTEN keeps a K x K window inside
    the map at its border, ablate cuts the centred neighbourhood there (zero-padded convolution's
    neighbourhood); the two agree at every position farther than K // 2 from the border."""
    try:
        from natten.functional import na2d
    except ImportError:
        return None
    heads, (h, w) = c // 32, res
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, kk, v = (torch.randn(n, h, w, heads, 32, generator=gen).to(device, dtype) for _ in range(3))

    # on the CPU NATTEN runs on FlexAttention, which refuses inputs that need a gradient there
    backward = device.type == "cuda"

    def setup():
        qi, ki, vi = (_leaf(t) if backward else t for t in (q, kk, v))
        return (lambda: na2d(qi, ki, vi, kernel_size=k)), [qi], [ki, vi]

    return Candidate("NATTEN na2d (q, k, v only)", setup, passes=PASSES if backward else ("fwd",))


def _mixer_candidates(preset, n, c, res, k, device, dtype, seed) -> list[Candidate]:
    """An operator of the attention, window-matrix and per-position families with the Swin block's
    projections: the reference against the fast path (on a GPU the timed route of neighbourhood and
    global attention and of window matrices, and each of its candidates; the native kernels on the
    CPU), and NATTEN for neighbourhood attention."""
    from ablate.models.blocks import pointwise
    from ablate.ops.fast import wide_attention

    spec = PRESETS[preset].at_window(k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c, *res, generator=gen).to(device, dtype)
    cpg = _channels_per_group(preset)
    shifted = spec.connectivity.kind == "window"  # a shifted layer: the window's dearer form

    # the operators whose GPU core is a timed route: each candidate is timed beside the route's choice
    form = {"neighborhood_attention": wide_attention.NEIGHBOURHOOD, "global_attention": wide_attention.GLOBAL,
            "local_mlp": "windowed"}.get(preset)

    def ours(backend, route=None):
        def setup():
            mixer = SpatialMixer(spec, c, res, cpg, shifted=shifted, backend=backend).to(device, dtype)
            proj = pointwise(c, c).to(device, dtype).to(memory_format=torch.channels_last)
            xi = _leaf(x.contiguous(memory_format=torch.channels_last))

            def call():
                if route is None:
                    return mixer(xi, value_proj=proj)
                with routes.forced(form, route):
                    return mixer(xi, value_proj=proj)
            return call, [xi], [*mixer.parameters(), *proj.parameters()]
        return setup

    cands = [Candidate("ablate reference", ours("reference"), baseline=True),
             Candidate("ablate fast", ours("fast"))]
    if form is not None and device.type == "cuda":
        cands += [Candidate(f"ablate fast: {name}", ours("fast", name)) for name in routes.runnable(form)]
    if preset == "neighborhood_attention":
        cands += [c_ for c_ in [_natten_candidate(n, c, res, k, device, dtype, seed)] if c_ is not None]
    return cands


OPERATORS = ("dwconv", "dynamic_dwconv", "idynamic_dwconv", "local_attention", "local_mlp",
             "locally_connected", "neighborhood_attention", "global_attention")


def _channels_per_group(preset: str) -> int:
    """The preset's channels per weight group (heads 32 wide; the local MLP's groups too)."""
    per_group = PRESETS[preset].spec.sharing.channels_per_group
    return per_group if isinstance(per_group, int) else 1


def _bytes_moved(kind: str, x: torch.Tensor, wt: torch.Tensor) -> dict[str, int]:
    """Bytes a pass must read and write at least (each operand once), for the achieved bandwidth."""
    xb, wb = x.numel() * x.element_size(), wt.numel() * wt.element_size()
    return {"fwd": 2 * xb + wb, "bwd_input": 2 * xb + wb, "bwd_weight": 2 * xb + wb,
            "fwd_bwd": 6 * xb + 3 * wb}


def operator_rows(size: str, stages: Sequence[int], ops: Sequence[str], batch: int, device, dtype,
                  rounds: int, warmup: int, copy_bw: float | None) -> list[dict]:
    dims = SIZES[size]
    widths, sizes = stage_geometry((dims.img_size,) * 2, dims.patch_size, dims.embed_dim, len(dims.depths))
    rows = []
    for s in stages:
        c, (h, w) = widths[s - 1], sizes[s - 1]
        for op in ops:
            kind = {"dwconv": "static", "dynamic_dwconv": "homogeneous", "idynamic_dwconv": "inhomogeneous",
                    "local_attention": "attention"}.get(op, "mixer")
            if kind in ("attention", "mixer") and c % _channels_per_group(op):
                continue
            if kind == "attention":
                cands = _attention_candidates(batch, c, (h, w), True, dims.window, device, dtype, s)
                moved = {}
            elif kind == "mixer":
                cands = _mixer_candidates(op, batch, c, (h, w), dims.window, device, dtype, s)
                moved = {}
            else:
                groups = 32 if c % 32 == 0 else c
                x, wt = _dw_family(kind, batch, c, h, w, groups, dims.window, device, dtype, s)
                cands = {"static": _static_candidates, "homogeneous": _homogeneous_candidates,
                         "inhomogeneous": _inhomogeneous_candidates}[kind](x, wt, device)
                moved = _bytes_moved(kind, x, wt)
            result = _time_candidates(cands, device, rounds, warmup)
            base = next(c_ for c_ in cands if c_.baseline).name
            for cand in cands:
                r = result[cand.name]
                row = {"size": size, "stage": s, "shape": f"{batch}x{c}x{h}x{w}", "operator": op,
                       "candidate": cand.name, "baseline": base}
                for p in PASSES:
                    t = r["median"].get(p)  # None: a pass the candidate does not have
                    row[f"{p}_ms"] = None if t is None else round(1e3 * t, 3)
                    row[f"{p}_speedup"] = round(result[base]["median"][p] / t, 2) if t else None
                row["fwd_bwd_min_ms"] = (round(1e3 * r["min"]["fwd_bwd"], 3) if "fwd_bwd" in r["min"]
                                         else None)
                row["peak_mb"] = None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**20, 1)
                bp = result[base]["peak_bytes"]
                row["peak_vs_baseline"] = (round(r["peak_bytes"] / bp, 3)
                                           if r["peak_bytes"] is not None and bp else None)
                if copy_bw and moved and cand.name.startswith("ablate"):
                    bw = {p: moved[p] / r["median"][p] for p in PASSES}
                    row["fwd_gbps"] = round(bw["fwd"] / 1e9, 1)
                    row["fwd_bwd_gbps"] = round(bw["fwd_bwd"] / 1e9, 1)
                    row["fwd_copy_fraction"] = round(bw["fwd"] / copy_bw, 3)
                    row["fwd_bwd_copy_fraction"] = round(bw["fwd_bwd"] / copy_bw, 3)
                rows.append(row)
            print(f"  {size} stage {s} {op} (forward + backward): " + ", ".join(
                f"{c_.name} {1e3 * result[c_.name]['median'][c_.passes[-1]]:.1f} ms" for c_ in cands),
                flush=True)
    return rows


# -- models --------------------------------------------------------------------------------------
# The protocol of a train step, as a user trains: autocast in `dtype` (bf16 on a GPU), channels_last,
# AdamW (fused on a GPU), cross-entropy on 1000 classes; eager, or torch.compile'd as
# `trainer.compile=true` does (default mode, static shapes).
def _model(name: str, size: str, backend: str):
    import timm

    if name == "swin_tiny":
        return timm.create_model("swin_tiny_patch4_window7_224", num_classes=1000)
    from ablate.models.zoo import create

    return apply_backend(create(name, size, num_classes=1000), backend)


def _optimizer(model, kind: str, device):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-3, **fused)


def _resident_bytes(model, optimizer) -> int:
    """Parameters, gradients and optimizer state: what training the model holds between steps."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _room_for_compiled_models(count: int) -> None:
    """Every model instance of one class shares its forward's code object, and dynamo keeps at most
    `recompile_limit` (8) compiled versions of one code object: past that it silently runs the rest
    eagerly, frame by frame (measured here: the fifth of nine compiled presets ran 5x slower than
    eager). Each model needs two (train, eval) per batch size."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * count)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * count)


class _Bench:
    """One model of the rounds: its train and inference steps on the shared batch."""

    def __init__(self, name, size, backend, device, dtype, channels_last, compiled, optimizer):
        model = _model(name, size, backend).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.name, self.model, self.device, self.dtype = name, model, device, dtype
        self.optimizer = _optimizer(model, optimizer, device)
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.gmac = model.macs() / 1e9 if hasattr(model, "macs") else None

    def train(self, x, target, dtype=None):
        dtype = dtype or self.dtype
        self.model.train()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(self.forward(x).float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def infer(self, x, target=None):
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                             enabled=self.dtype != torch.float32):
            self.forward(x)

    def peak_bytes(self, x, target) -> int | None:
        """Peak memory of training this model alone: what it holds between steps plus the peak one
        step adds on top (activations, temporaries)."""
        with PeakMemory(self.device) as peak:
            self.train(x, target)
        return None if peak.peak is None else _resident_bytes(self.model, self.optimizer) + peak.peak


def _batch(size: str, batch: int, device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The models' shared batch: random images of the size's resolution and 1000-class targets."""
    img = SIZES[size].img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device)
    target = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), target


def model_rows(names: Sequence[str], size: str, batch: int, device, dtype, rounds: int, warmup: int,
               backend: str, channels_last: bool, vs_bf16: bool = False, compiled: bool = False,
               optimizer: str = "adamw") -> list[dict]:
    """timm's benchmark columns: train and inference samples/s of every model, interleaved in rounds
    (one step of each model per round, so a slow moment of the machine hits every model alike); with
    `vs_bf16`, each train step is also timed under bf16 autocast in the same rounds
    (`train_speedup_bf16`: its samples/s over the `dtype` step's). `compiled`: every model through
    torch.compile; its compile time (the first round's excess over the timed steps) is `compile_s`."""
    img = SIZES[size].img_size
    x, target = _batch(size, batch, device, channels_last)
    if compiled:
        _room_for_compiled_models(len(names))
    benches = {n: _Bench(n, size, backend, device, dtype, channels_last, compiled, optimizer) for n in names}
    mode = "compiled" if compiled else "eager"
    times = {n: {"train": [], "infer": [], "train_bf16": []} for n in names}
    first = {n: 0.0 for n in names}
    steps = [("train", lambda b: b.train(x, target)), ("infer", lambda b: b.infer(x))]
    if vs_bf16:
        steps.append(("train_bf16", lambda b: b.train(x, target, torch.bfloat16)))
    started = time.perf_counter()
    for r in range(warmup + rounds):
        for name, bench in benches.items():
            for kind, step in steps:
                _sync(device)
                t = time.perf_counter()
                step(bench)
                _sync(device)
                took = time.perf_counter() - t
                if r >= warmup:
                    times[name][kind].append(took)
                elif r == 0 and kind in ("train", "infer"):
                    first[name] += took
            if r == 0:
                print(f"  models {size} {mode}: {name} first steps {first[name]:.1f} s", flush=True)
        print(f"  models {size} {mode} round {r + 1}/{warmup + rounds} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    for name, bench in benches.items():
        tr, inf = statistics.median(times[name]["train"]), statistics.median(times[name]["infer"])
        peak = bench.peak_bytes(x, target)
        rows.append({
            "model": name if name == "swin_tiny" else f"ablate_{name}_{size}", "size": size, "mode": mode,
            "backend": "timm" if name == "swin_tiny" else backend, "channels_last": channels_last,
            "optimizer": optimizer,
            "infer_samples_per_sec": round(batch / inf, 2), "infer_step_time": round(1e3 * inf, 2),
            "infer_batch_size": batch, "infer_img_size": img,
            "train_samples_per_sec": round(batch / tr, 2), "train_step_time": round(1e3 * tr, 2),
            "train_batch_size": batch, "train_img_size": img,
            "param_count": round(sum(p.numel() for p in bench.model.parameters()) / 1e6, 2),
            "gmac": bench.gmac,
            "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "compile_s": round(max(0.0, first[name] - tr - inf), 1) if compiled else None})
        if vs_bf16:
            rows[-1]["train_speedup_bf16"] = round(tr / statistics.median(times[name]["train_bf16"]), 3)
    benches.clear()
    _release(device)
    swin = next((r for r in rows if r["model"] == "swin_tiny"), None)
    dwconv = next((r for r in rows if r["model"] == f"ablate_dwconv_{size}"), None)
    if swin is not None and swin["gmac"] is None:  # timm's Swin-T: ablate's local_attention's count
        swin["gmac"] = _model("local_attention", size, backend).macs() / 1e9
    for row in rows:
        row["train_vs_swin_tiny"] = (round(row["train_samples_per_sec"] / swin["train_samples_per_sec"], 3)
                                     if swin else None)
        # as fast per FLOP as dwconv = 1.0: samples/s x GMAC, relative to dwconv's, in a train step
        work = row["train_samples_per_sec"] * (row["gmac"] or 0.0)
        row["efficiency_vs_dwconv"] = (round(work / (dwconv["train_samples_per_sec"] * dwconv["gmac"]), 2)
                                       if dwconv and row["gmac"] else None)
        row["gmac"] = None if row["gmac"] is None else round(row["gmac"], 4)
    return rows


def profile_rows(names: Sequence[str], size: str, batch: int, device, dtype, warmup: int, backend: str,
                 channels_last: bool, optimizer: str = "adamw", steps: int = 2, top: int = 10) -> list[dict]:
    """Where an eager train step's time goes, per model: `steps` steps under torch.profiler after
    `warmup` steps (which time the routes), each PyTorch operator's self time on the device (the
    kernels it launched itself: a GPU's; on a CPU its own CPU time), largest first, the `top` of
    them and a row for the rest. Shares are of the step's device time; a custom operator (ablate's
    Triton and native kernels) is a row of its own."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    x, target = _batch(size, batch, device, channels_last)
    rows = []
    for name in names:
        bench = _Bench(name, size, backend, device, dtype, channels_last, False, optimizer)
        for _ in range(warmup):
            bench.train(x, target)
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                bench.train(x, target)
            _sync(device)
        # operators only (the kernels' own events would count their time twice), by self time
        times = [(e.key, e.self_device_time_total if gpu else e.self_cpu_time_total, e.count)
                 for e in prof.key_averages() if e.device_type == DeviceType.CPU]
        times = sorted((t for t in times if t[1] > 0), key=lambda t: -t[1])
        total = sum(t for _, t, _ in times)
        model = name if name == "swin_tiny" else f"ablate_{name}_{size}"
        rest = times[top:]
        listed = times[:top] + ([(f"the other {len(rest)} operators", sum(t for _, t, _ in rest),
                                  sum(c for _, _, c in rest))] if rest else [])
        for op, t, count in listed:
            rows.append({"model": model, "size": size, "operator": op,
                         "ms_per_step": round(t / steps / 1e3, 3), "share": round(t / total, 3),
                         "calls_per_step": round(count / steps, 1),
                         "step_ms": round(total / steps / 1e3, 2)})
        del bench
        _release(device)
        print(f"  profile {size}: {name} {total / steps / 1e3:.1f} ms of "
              f"{'GPU' if gpu else 'CPU'} time a step", flush=True)
    return rows


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prewarm(names: Sequence[str], size: str, batch: int, device: str, dtype: str, backend: str,
            channels_last: bool, workers: int, mode: str) -> None:
    """Compile the models' kernels in `workers` processes at once, so that the timing process finds
    them in Triton's and inductor's caches (on disk, shared): compiling is CPU work, and one process
    compiling a dozen models in turn is most of a GPU bench's wall time. `mode` eager: every route
    candidate of each shape (the Triton kernels the routes' timing compiles); compiled: the models'
    graphs."""
    import subprocess

    chunks = [list(names[i::workers]) for i in range(workers) if names[i::workers]]
    procs = [subprocess.Popen([sys.executable, "-m", "ablate.bench", "--prewarm-only", "--device", device,
                               "--dtype", dtype, "--backend", backend, "--sizes", size, "--model-batch",
                               str(batch), "--section", "models", *(["--nchw"] if not channels_last else []),
                               "--compile", mode, "--models", *chunk], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for chunk in chunks]
    for proc, chunk in zip(procs, chunks):
        _, err = proc.communicate()
        if proc.returncode != 0:  # the timing process compiles it again and shows the error there
            print(f"  prewarm of {chunk} failed: {err.strip().splitlines()[-1] if err.strip() else '?'}",
                  flush=True)


# -- output --------------------------------------------------------------------------------------
def _markdown(rows: list[dict], columns: Sequence[str]) -> str:
    if not rows:
        return ""
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


OP_COLUMNS = ("size", "stage", "shape", "operator", "candidate", "fwd_ms", "bwd_input_ms", "bwd_weight_ms",
              "fwd_bwd_ms", "fwd_bwd_speedup", "fwd_speedup", "bwd_input_speedup", "bwd_weight_speedup",
              "peak_mb", "peak_vs_baseline", "fwd_gbps", "fwd_copy_fraction", "fwd_bwd_copy_fraction")
MODEL_COLUMNS = ("model", "size", "mode", "backend", "channels_last", "train_samples_per_sec",
                 "train_vs_swin_tiny", "gmac", "efficiency_vs_dwconv", "peak_gib", "compile_s",
                 "infer_samples_per_sec", "train_step_time", "infer_step_time", "train_batch_size",
                 "infer_batch_size", "param_count", "train_speedup_bf16")


PROFILE_COLUMNS = ("model", "operator", "ms_per_step", "share", "calls_per_step", "step_ms")


def _machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def route_rows(chosen: dict[str, str]) -> list[dict]:
    """Rows of the routes a process took (key -> candidate); the key's GPU and PyTorch version are
    the bench's header's."""
    return [{"form and operands": "; ".join(key.split(" | ")[2:]), "candidate": name}
            for key, name in sorted(chosen.items())]


def write_outputs(out: Path, ops: list[dict], models: list[dict], meta: dict,
                  profiled: list[dict] | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    profiled = profiled or []
    paths = {}
    for name, rows in (("operators", ops), ("models", models), ("profile", profiled)):
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        paths[f"{name}_csv"] = out / f"{name}.csv"
        with open(paths[f"{name}_csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    paths["json"] = out / "bench.json"
    paths["json"].write_text(json.dumps({"meta": meta, "operators": ops, "models": models,
                                         "profile": profiled}, indent=1))
    md = [f"# ablate bench ({meta['machine'].get('gpu') or meta['machine'].get('cpu', '')}, "
          f"{meta['machine']['cpu_threads']} threads, {meta['dtype']})", ""]
    if ops:
        md += ["## Operators (median ms per pass; speedup = baseline time / time)", "",
               _markdown(ops, OP_COLUMNS), ""]
    if models:
        md += ["## Models (samples/s, timm benchmark columns)", "", _markdown(models, MODEL_COLUMNS), ""]
    if profiled:
        md += ["## Where an eager train step's time goes (torch.profiler: each operator's self time on "
               "the GPU, or the CPU without one; its share of the step's)", "",
               _markdown(profiled, PROFILE_COLUMNS), ""]
    if meta.get("routes"):
        md += [f"## Routes (the candidate each shape took: ablate/ops/fast/routes.py; "
               f"{meta.get('routes_timing_s', 0)} s timing them)", "",
               _markdown(route_rows(meta["routes"]), ("form and operands", "candidate")), ""]
    paths["markdown"] = out / "bench.md"
    paths["markdown"].write_text("\n".join(md))
    return paths


@dataclass
class BenchArgs:
    device: str = "auto"
    out: str = "reports/bench"
    quick: bool = False
    section: str = "all"
    sizes: tuple[str, ...] | None = None  # None: tiny on a GPU; tiny and micro on the CPU
    stages: tuple[int, ...] = (1, 2, 3, 4)
    ops: tuple[str, ...] = OPERATORS
    models: tuple[str, ...] = tuple(PRESETS)
    batch: int | None = None
    model_batch: int | None = None
    rounds: int | None = None
    dtype: str = "auto"
    backend: str = "fast"
    channels_last: bool = True
    vs_bf16: bool = False
    compile: str = "auto"  # eager, compiled, both; auto: both on a GPU, eager on the CPU
    optimizer: str = "adamw"
    prewarm: int | None = None  # processes compiling the models' kernels before the eager and compiled rounds
    prewarm_only: bool = False  # (a prewarm process) compile and step each model once, time nothing


def _models_of(args: BenchArgs, size: str) -> list[str]:
    # dwconv is the yardstick of every model's efficiency (samples/s x GMAC relative to it); timm's
    # Swin-T stands beside the tiny models
    # (timm's model is built for 224 px: at another size it is left out)
    names = list(dict.fromkeys(["dwconv", *(m for m in args.models if m != "swin_tiny" or size == "tiny")]))
    return names + (["swin_tiny"] if size == "tiny" and "swin_tiny" not in names else [])


def _prewarm_only(args: BenchArgs, device, dtype, size: str, batch: int) -> None:
    x, target = _batch(size, batch, device, args.channels_last)
    _room_for_compiled_models(len(args.models))
    eager = args.compile == "eager"
    for name in args.models:
        for compiled in (False,) if eager else (False, True):  # eager steps compile FlexAttention's too
            bench = _Bench(name, size, args.backend, device, dtype, args.channels_last, compiled,
                           args.optimizer)
            # Before the eager rounds no route is chosen yet: each shape's candidates run once
            # (compiling them), untimed, as processes sharing the GPU would time each other. The
            # compiled prewarm comes after them and takes the routes they chose (the routes' file).
            with routes.rehearsing() if eager else contextlib.nullcontext():
                bench.train(x, target)
                bench.infer(x)
            del bench
            _release(device)


def _model_batch(args: BenchArgs, size: str, gpu: bool) -> int:
    """The models' batch (the model and profile sections): tiny 128 on a GPU and 8 on a CPU, micro
    128, 2 with --quick, or --model-batch."""
    return args.model_batch or (2 if args.quick else {"tiny": 128 if gpu else 8, "micro": 128}[size])


def run(args: BenchArgs) -> dict:
    device = checked_device(args.device, "--device")
    gpu = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    sizes = args.sizes or (("tiny",) if gpu else ("tiny", "micro"))
    if args.prewarm_only:
        for size in sizes:
            _prewarm_only(args, device, dtype, size, args.model_batch or 128)
        return {}
    rounds = args.rounds or (2 if args.quick else (10 if gpu else 3))
    warmup = 1 if args.quick or not gpu else 3
    modes = {"auto": ("eager", "compiled") if gpu else ("eager",), "both": ("eager", "compiled"),
             "eager": ("eager",), "compiled": ("compiled",)}[args.compile]
    copy_bw = copy_bandwidth(device)
    meta = {"machine": _machine(device), "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
            "warmup": warmup, "copy_bandwidth_gbps": None if copy_bw is None else round(copy_bw / 1e9, 1),
            "optimizer": args.optimizer, "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before measuring: a bad --out costs nothing
    started = time.perf_counter()
    routes.forget_used()
    ops, models = [], []
    if args.section in ("all", "ops"):
        for size in sizes:
            # tiny at 224 px: batch 32 on the CPU, 128 on a GPU; micro: the micro recipe's 128
            batch = args.batch or (4 if args.quick else {"tiny": 128 if gpu else 32, "micro": 128}[size])
            print(f"operators: {size}, batch {batch}, {device}, {meta['dtype']}", flush=True)
            ops += operator_rows(size, args.stages, args.ops, batch, device, dtype, rounds, warmup, copy_bw)
    if args.section in ("all", "models"):
        for size in sizes:
            batch = _model_batch(args, size, gpu)
            names = _models_of(args, size)
            # a CPU train step of every model is slow: 2 rounds unless --rounds asks for more
            model_rounds = 1 if args.quick else (args.rounds or (rounds if gpu else 2))
            for mode in modes:
                compiled = mode == "compiled"
                workers = args.prewarm if args.prewarm is not None else (4 if gpu else 0)
                if workers:
                    print(f"models: {size}, {mode}: compiling in {workers} processes first", flush=True)
                    prewarm(names, size, batch, str(device), args.dtype, args.backend, args.channels_last,
                            workers, mode)
                print(f"models: {size}, batch {batch}, {mode}", flush=True)
                models += model_rows(names, size, batch, device, dtype, model_rounds, warmup, args.backend,
                                     channels_last=args.channels_last, vs_bf16=args.vs_bf16,
                                     compiled=compiled, optimizer=args.optimizer)
                # written as each mode is done: a time-boxed check stopped while compiling keeps the
                # eager rows and the routes they took
                write_outputs(Path(args.out), ops, models, _with_routes(meta, started))
    profiled = []
    if args.section == "profile":
        for size in sizes:
            batch = _model_batch(args, size, gpu)
            print(f"profile: {size}, batch {batch}, eager", flush=True)
            for name in _models_of(args, size):
                profiled += profile_rows([name], size, batch, device, dtype, warmup, args.backend,
                                         args.channels_last, args.optimizer, steps=1 if args.quick else 2)
                # written as each model is done: a time-boxed check that stops midway keeps them
                write_outputs(Path(args.out), ops, models, _with_routes(meta, started), profiled)
    paths = write_outputs(Path(args.out), ops, models, _with_routes(meta, started), profiled)
    print(paths["markdown"].read_text())
    return {"operators": ops, "models": models, "profile": profiled, "meta": meta, "paths": paths}


def _with_routes(meta: dict, started: float) -> dict:
    """`meta` with the wall time so far and the routes taken so far: on a GPU, what each shape's
    timing chose (empty elsewhere), and the seconds that timing took (included in wall_s)."""
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["routes"] = routes.used()
    meta["routes_timing_s"] = round(routes.timing_seconds(), 1)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablate.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto",
                   help="auto ($ABLATE_DEVICE where set, else cuda if there is one), cpu, cuda, cuda:<index>")
    p.add_argument("--out", default="reports/bench", help="folder for operators.csv, models.csv, bench.json, "
                                                           "bench.md")
    p.add_argument("--quick", action="store_true", help="small batches and 2 rounds: a smoke run")
    p.add_argument("--section", choices=["all", "ops", "models", "profile"], default="all",
                   help="all: operators and models; profile: where each model's eager train step spends its "
                        "time (torch.profiler)")
    p.add_argument("--sizes", nargs="+", choices=["micro", "tiny"],
                   help="model sizes (default: tiny on a GPU, tiny and micro on the CPU)")
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--ops", nargs="+", default=list(OPERATORS), choices=list(OPERATORS))
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=[*PRESETS, "swin_tiny"])
    p.add_argument("--batch", type=at_least(1, "a batch size"),
                   help="operator batch (default: 32 CPU / 128 GPU at tiny, 128 micro)")
    p.add_argument("--model-batch", type=at_least(1, "a batch size"),
                   help="model batch (default: 8 CPU / 128 GPU at tiny, 128 micro)")
    p.add_argument("--rounds", type=at_least(1, "a number of rounds"),
                   help="timed rounds (default: 3 CPU (models 2), 10 GPU, 2 quick)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--backend", default="fast", choices=["fast", "reference"], help="backend of the models")
    p.add_argument("--compile", default="auto", choices=["auto", "eager", "compiled", "both"],
                   help="models eager, through torch.compile, or both (auto: both on a GPU, eager on "
                        "the CPU)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="the train step's optimizer (adamw: fused on a GPU)")
    p.add_argument("--prewarm", type=at_least(0, "a number of processes"),
                   help="processes that compile the models' kernels before the "
                   "eager rounds (every route candidate's) and the compiled ones (the graphs) (default: 4 "
                   "on a GPU, 0 on the CPU)")
    p.add_argument("--prewarm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vs-bf16", action="store_true", help="also time every model's train step under bf16 "
                   "autocast, interleaved: the train_speedup_bf16 column")
    p.add_argument("--nchw", action="store_true", help="models in NCHW memory (default channels_last, the "
                                                         "fast layout of 1x1 convs on CPU and GPU alike)")
    a = p.parse_args(argv)
    if "swin_tiny" in a.models and a.sizes and "tiny" not in a.sizes:
        p.error("--models swin_tiny: timm's Swin-T is built for 224 px, the tiny size; add tiny to --sizes")
    run(BenchArgs(a.device, a.out, a.quick, a.section, tuple(a.sizes) if a.sizes else None, tuple(a.stages),
                  tuple(a.ops), tuple(a.models), a.batch, a.model_batch, a.rounds, a.dtype, a.backend,
                  not a.nchw, a.vs_bf16, a.compile, a.optimizer, a.prewarm, a.prewarm_only))
    return 0


if __name__ == "__main__":
    run_cli(main)
