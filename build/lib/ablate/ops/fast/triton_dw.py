"""Triton kernels (GPU) of the depth-wise family, NHWC, forward and both gradients.

Two kernel families cover static, homogeneous dynamic and inhomogeneous dynamic depth-wise
convolution:

- kernel weights w[n, c, k] (static: the batch stride of w is 0; homogeneous: a kernel per
  instance): `_kernel_fwd` (forward; the input gradient is the same kernel with the flipped kernel)
  and `_kernel_wgrad` (weight gradient: a program per kernel row walks the whole map and writes its
  taps once; no atomics for per-instance kernels);
- position weights w[n, g, k, h, w] (inhomogeneous, locally connected: a group's weights at every
  position): `_position_fwd` (forward, and with ADJOINT the input gradient, which reads w and the
  output gradient at the shifted position) and `_position_wgrad`.

A program owns a tile of BLOCK_P positions x BLOCK_C channels: in NHWC the channels of a position
are contiguous, so every load is coalesced, and a group's weight at a position is loaded once for
the channels of the tile that share it (the inhomogeneous kernel's advantage over one thread per
output, which reloads it per channel). Storage may be bf16/fp16; accumulation is fp32.

The per-position weight gradient is a correlation of two maps (sum over a group's channels of one
map times the other's neighbour), neighbourhood attention's logits: `position_correlate` is that
kernel as an operator, whose gradients are the forward and adjoint kernels.

On the CPU these kernels run through Triton's interpreter (TRITON_INTERPRET=1 before importing
this module); the tests do that on tiny shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["kernel_aggregate", "position_aggregate", "position_correlate", "naive_position_forward",
           "POSITION_TILES", "DEFAULT_TILE"]


@triton.jit
def _kernel_fwd(x_ptr, w_ptr, y_ptr, H, W, C,
                sxn, sxc, sxh, sxw, swn, swc, swk, syn, syc, syh, syw,
                K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    tiles = tl.cdiv(H * W, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    h, w = p // W, p % W
    pm, cm = p < H * W, c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in tl.range(K * K):  # a loop, not unrolled (tl.static_range): why, above BLOCK_P below
        hh, ww = h + (t // K - K // 2), w + (t % K - K // 2)
        ok = pm & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        xv = tl.load(x_ptr + n * sxn + hh[:, None] * sxh + ww[:, None] * sxw + c[None, :] * sxc,
                     mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + n * swn + c * swc + t * swk, mask=cm, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    tl.store(y_ptr + n * syn + h[:, None] * syh + w[:, None] * syw + c[None, :] * syc,
             acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _kernel_wgrad(x_ptr, g_ptr, gw_ptr, N, PER, H, W, C,
                  sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, swn, swc, swk,
                  K: tl.constexpr, KP: tl.constexpr, ATOMIC: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # gw[n, c, r*K + j] = sum over positions i of gy[n, i, c] x[n, i + (r - K//2, j - K//2), c].
    # A program owns one kernel row r of a block of channels for PER instances from chunk * PER and
    # walks the whole map, holding the row's K taps as a [KP, BLOCK_C] accumulator: each weight's
    # gradient is written once at the end, with no per-tile partial sums and no atomics (per-instance
    # kernels: PER = 1, a row of gw each). A kernel shared by the batch (swn = 0) is summed over the
    # program's chunk of it; with several chunks (ATOMIC) the chunks meet by float32 atomic adds.
    chunk, r = tl.program_id(0) // K, tl.program_id(0) % K
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    j = tl.arange(0, KP)
    dx = j - K // 2
    first = chunk.to(tl.int64) * PER
    count = tl.minimum(PER, N - first)
    acc = tl.zeros((KP, BLOCK_C), dtype=tl.float32)
    # while loops, not range(runtime bound): see _position_wgrad
    i = 0
    while i < count:
        n = first + i
        start = 0
        while start < H * W:
            p = start + tl.arange(0, BLOCK_P)
            pm = p < H * W
            h, w = p // W, p % W
            gv = tl.load(g_ptr + n * sgn + (h * sgh + w * sgw)[:, None] + c[None, :] * sgc,
                         mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            hh = h + (r - K // 2)
            ww = w[None, :] + dx[:, None]  # [KP, BLOCK_P]
            ok = ((j < K)[:, None] & (pm & (hh >= 0) & (hh < H))[None, :] & (ww >= 0) & (ww < W))
            xv = tl.load(x_ptr + n * sxn + (hh * sxh)[None, :, None] + (ww * sxw)[:, :, None]
                         + c[None, None, :] * sxc, mask=ok[:, :, None] & cm[None, None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(xv * gv[None, :, :], axis=1)
            start += BLOCK_P
        i += 1
    out = gw_ptr + chunk.to(tl.int64) * swn + c[None, :] * swc + (r * K + j)[:, None] * swk
    mask = (j < K)[:, None] & cm[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _group_tile(c0, C, CG, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Channels of a tile of BLOCK_G whole groups from group c0: (g, c, mask), c shaped [1, BG, CG]."""
    g = c0 + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_CG)
    c = g[:, None] * CG + j[None, :]
    cm = (j[None, :] < CG) & (c < C)
    return g, c[None, :, :], cm[None, :, :]


@triton.jit
def _position_fwd(x_ptr, w_ptr, y_ptr, H, W, C, CG,
                  sxn, sxc, sxh, sxw, swn, swg, swk, swh, sww, syn, syc, syh, syw,
                  K: tl.constexpr, ADJOINT: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    # forward:  y[n, i, c] = sum_k w[n, g(c), k, i] x[n, i + d_k, c]
    # ADJOINT:  y[n, j, c] = sum_k w[n, g(c), k, j - d_k] x[n, j - d_k, c]  (x: the output gradient)
    # A tile is BLOCK_P positions x BLOCK_G whole groups (their channels padded to BLOCK_CG): a group's
    # weight at a position is loaded once, [P, G], and broadcast over its channels.
    tiles = tl.cdiv(H * W, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    g, c, cm = _group_tile(tl.program_id(1) * BLOCK_G, C, CG, BLOCK_G, BLOCK_CG)
    gm = g < tl.cdiv(C, CG)
    h, w = p // W, p % W
    pm = p < H * W
    acc = tl.zeros((BLOCK_P, BLOCK_G, BLOCK_CG), dtype=tl.float32)
    for t in tl.range(K * K):
        if ADJOINT:
            hh, ww = h - (t // K - K // 2), w - (t % K - K // 2)
        else:
            hh, ww = h + (t // K - K // 2), w + (t % K - K // 2)
        ok = pm & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        xv = tl.load(x_ptr + n * sxn + (hh * sxh + ww * sxw)[:, None, None] + c * sxc,
                     mask=ok[:, None, None] & cm, other=0.0).to(tl.float32)
        wh, wwi = (hh, ww) if ADJOINT else (h, w)
        wv = tl.load(w_ptr + n * swn + g[None, :] * swg + t * swk + (wh * swh + wwi * sww)[:, None],
                     mask=ok[:, None] & gm[None, :], other=0.0).to(tl.float32)
        acc += xv * wv[:, :, None]
    tl.store(y_ptr + n * syn + (h * syh + w * syw)[:, None, None] + c * syc,
             acc.to(y_ptr.dtype.element_ty), mask=pm[:, None, None] & cm)


@triton.jit
def _position_wgrad(x_ptr, g_ptr, gw_ptr, N, PER, H, W, C, CG,
                    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, swn, swg, swk, swh, sww,
                    K: tl.constexpr, ATOMIC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    # gw[n, g, k, i] = sum over c in group g of gy[n, i, c] x[n, i + d_k, c]. A program sums PER
    # instances from instance chunk * PER: per-instance weights have PER = 1 and their own row of gw;
    # weights shared over the batch (the locally connected layer; swn = 0) are summed inside the
    # program over its chunk of the batch, so no per-instance gradient (N times the weights) is ever
    # written, and with several chunks (ATOMIC) the chunks' sums meet in a float32 gw by atomic adds.
    tiles = tl.cdiv(H * W, BLOCK_P)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    g, c, cm = _group_tile(tl.program_id(1) * BLOCK_G, C, CG, BLOCK_G, BLOCK_CG)
    gm = g < tl.cdiv(C, CG)
    h, w = p // W, p % W
    pm = p < H * W
    chunk = (tl.program_id(0) // tiles).to(tl.int64)
    first = chunk * PER
    count = tl.minimum(PER, N - first)
    for t in tl.range(K * K):
        hh, ww = h + (t // K - K // 2), w + (t % K - K // 2)
        ok = pm & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        acc = tl.zeros((BLOCK_P, BLOCK_G), dtype=tl.float32)
        # a while loop, not range(count): Triton 3.6's interpreter cannot take a runtime bound under
        # NumPy 2.5 (it converts a 1-element array to an int), and the tests run the interpreter
        i = 0
        while i < count:
            n = first + i
            gv = tl.load(g_ptr + n * sgn + (h * sgh + w * sgw)[:, None, None] + c * sgc,
                         mask=pm[:, None, None] & cm, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + n * sxn + (hh * sxh + ww * sxw)[:, None, None] + c * sxc,
                         mask=ok[:, None, None] & cm, other=0.0).to(tl.float32)
            acc += tl.sum(xv * gv, axis=2)
            i += 1
        out = gw_ptr + chunk * swn + g[None, :] * swg + t * swk + (h * swh + w * sww)[:, None]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=pm[:, None] & gm[None, :])
        else:
            tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=pm[:, None] & gm[None, :])


@triton.jit
def _position_fwd_naive(x_ptr, w_ptr, y_ptr, total, H, W, C, CG,
                        sxn, sxc, sxh, sxw, swn, swg, swk, swh, sww,
                        K: tl.constexpr, BLOCK: tl.constexpr):
    # The baseline of the benchmark: one thread per output element of a contiguous NCHW y, each
    # loading its own weights (no reuse across the channels of a group).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    om = o < total
    w_ = o % W
    h = (o // W) % H
    c = (o // (W * H)) % C
    n = o // (W * H * C)
    g = c // CG
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in tl.static_range(K * K):
        hh, ww = h + (t // K - K // 2), w_ + (t % K - K // 2)
        ok = om & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        xv = tl.load(x_ptr + n * sxn + c * sxc + hh * sxh + ww * sxw, mask=ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + n * swn + g * swg + t * swk + h * swh + w_ * sww, mask=ok, other=0.0)
        acc += xv * wv.to(tl.float32)
    tl.store(y_ptr + o, acc.to(y_ptr.dtype.element_ty), mask=om)


BLOCK_P, BLOCK_C = 64, 32
# The kernels loop over the K*K taps (tl.range), not unrolled (tl.static_range). Fully
# unrolled, the 7 x 7 kernels compiled for sm_90 took all 255 registers a thread has and spilled 64-128
# bytes of stack a thread (NHWC, bf16, each of the three per-position tiles), and 3-5 s of compile
# each; rolled, the default tile took 56 registers, no spill, 0.1-0.4 s (`python -m ablate.gpu_compile`,
# Triton 3.6 and 3.8): more programs a multiprocessor to hide the loads' latency, and a first GPU
# bench that is not mostly compiling. Unrolled by 7 (loop_unroll_factor) they spilled 64-968 bytes at
# every stage of I-D-DW conv: no candidate.
# the kernel weights' gradient holds a [K, BLOCK_P, BLOCK_C] tile of the map per step (a kernel row's
# shifts of it): a smaller tile of positions keeps it in registers
WGRAD_BLOCK_P, WGRAD_BLOCK_C = 32, 32


def _nhwc_strides(t: torch.Tensor):
    """Strides of an (N, C, H, W) tensor in the order the kernels take them: n, c, h, w."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _grid(n: int, h: int, w: int, c: int, block_c: int = BLOCK_C):
    return (n * triton.cdiv(h * w, BLOCK_P), triton.cdiv(c, block_c))


def _out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _kernel_forward(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """x (N, C, H, W) any strides; w (N|1, C, K*K) -> y (N, C, H, W) channels_last."""
    n, c, h, wd = x.shape
    y = _out(x)
    swn = 0 if w.shape[0] == 1 else w.stride(0)
    _kernel_fwd[_grid(n, h, wd, c)](x, w, y, h, wd, c, *_nhwc_strides(x), swn, w.stride(1), w.stride(2),
                                    *_nhwc_strides(y), K=k, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


def _kernel_weight_grad(x: torch.Tensor, gy: torch.Tensor, w_shape, k: int) -> torch.Tensor:
    """gw (N|1, C, K*K) in float32: per instance, or summed over the batch for a shared kernel."""
    n, c, h, wd = x.shape
    c_tiles = triton.cdiv(c, WGRAD_BLOCK_C)
    shared = w_shape[0] == 1 and n != 1
    per = _shared_chunks(n, k * c_tiles, _programs_wanted(x.device)) if shared else 1
    chunks = triton.cdiv(n, per)
    atomic = shared and chunks > 1
    gw = (torch.zeros if atomic else torch.empty)((w_shape[0], c, k * k), dtype=torch.float32,
                                                  device=x.device)
    _kernel_wgrad[(chunks * k, c_tiles)](
        x, gy, gw, n, per, h, wd, c, *_nhwc_strides(x), *_nhwc_strides(gy), 0 if shared else gw.stride(0),
        gw.stride(1), gw.stride(2), K=k, KP=triton.next_power_of_2(k), ATOMIC=atomic,
        BLOCK_P=WGRAD_BLOCK_P, BLOCK_C=WGRAD_BLOCK_C)
    return gw


# The per-position kernels' tiles: (positions, about this many channels, warps). The first is the
# default; the others are candidates the GPU's routes time (`position_aggregate(..., tile=)`): a wider
# channel tile reads longer contiguous rows of the NHWC map, a taller one reuses more of each weight
# row, and which pays is the GPU's to say.
POSITION_TILES = {"64x32": (64, 32, 4), "32x128": (32, 128, 4), "128x64": (128, 64, 8)}
DEFAULT_TILE = "64x32"


def _tile_name(kind: str) -> str:
    """The tile of a per-position operator kind: "position" (the default tile) or "position <tile>"."""
    name = kind.partition(" ")[2] or DEFAULT_TILE
    if name not in POSITION_TILES:
        raise ValueError(f"no per-position tile {name!r}: one of {list(POSITION_TILES)}")
    return name


def _group_blocks(c: int, groups: int, block_c: int = BLOCK_C) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_CG, group tiles): whole groups per tile, about `block_c` channels of them."""
    cg = c // groups
    block_cg = triton.next_power_of_2(cg)
    block_g = max(1, min(triton.next_power_of_2(groups), block_c // block_cg))
    return block_g, block_cg, triton.cdiv(groups, block_g)


def _position_forward(x: torch.Tensor, w: torch.Tensor, k: int, adjoint: bool = False,
                      tile: str = DEFAULT_TILE) -> torch.Tensor:
    """x (N, C, H, W); w (N|1, G, K*K, H, W) -> (N, C, H, W) channels_last."""
    n, c, h, wd = x.shape
    block_p, block_c, warps = POSITION_TILES[tile]
    y = _out(x)
    swn = 0 if w.shape[0] == 1 else w.stride(0)
    block_g, block_cg, group_tiles = _group_blocks(c, w.shape[1], block_c)
    grid = (n * triton.cdiv(h * wd, block_p), group_tiles)
    _position_fwd[grid](x, w, y, h, wd, c, c // w.shape[1], *_nhwc_strides(x), swn, *w.stride()[1:],
                        *_nhwc_strides(y), K=k, ADJOINT=adjoint,
                        BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_CG=block_cg, num_warps=warps)
    return y


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep a GPU busy: a few per multiprocessor. On the CPU (Triton's interpreter) a
    small number, so that the selfcheck's small shapes split a batch into chunks (even and uneven) as
    big ones do on a GPU, and a few fill it (one chunk)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 6


def _shared_chunks(n: int, programs: int, wanted: int) -> int:
    """Instances per program of a batch-shared weight's gradient: the whole batch where its tiles
    alone fill the GPU (an exact store, no atomics), else chunks of it until about `wanted` programs."""
    chunks = min(n, max(1, -(-wanted // programs)))
    return -(-n // chunks)


def _position_weight_grad(x: torch.Tensor, gy: torch.Tensor, w_shape, k: int, dtype,
                          tile: str = DEFAULT_TILE) -> torch.Tensor:
    """gw shaped as w (N|1, G, K*K, H, W): a weight shared over the batch gets the batch's sum."""
    n, c, h, wd = x.shape
    block_p, block_c, warps = POSITION_TILES[tile]
    block_g, block_cg, group_tiles = _group_blocks(c, w_shape[1], block_c)
    tiles = triton.cdiv(h * wd, block_p)
    shared = w_shape[0] == 1 and n != 1
    per = _shared_chunks(n, tiles * group_tiles, _programs_wanted(x.device)) if shared else 1
    chunks = triton.cdiv(n, per)
    atomic = shared and chunks > 1
    gw = (torch.zeros(w_shape, dtype=torch.float32, device=x.device) if atomic
          else torch.empty(w_shape, dtype=dtype, device=x.device))
    swn = 0 if shared else gw.stride(0)
    _position_wgrad[(chunks * tiles, group_tiles)](
        x, gy, gw, n, per, h, wd, c, c // w_shape[1], *_nhwc_strides(x), *_nhwc_strides(gy),
        swn, *gw.stride()[1:], K=k, ATOMIC=atomic, BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_CG=block_cg,
        num_warps=warps)
    return gw.to(dtype)


def naive_position_forward(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """The one-thread-per-output baseline (forward only), for the benchmark."""
    n, c, h, wd = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    total, block = y.numel(), 256
    swn = 0 if w.shape[0] == 1 else w.stride(0)
    _position_fwd_naive[(triton.cdiv(total, block),)](
        x, w, y, total, h, wd, c, c // w.shape[1], *_nhwc_strides(x), swn, *w.stride()[1:], K=k, BLOCK=block)
    return y


# The passes as PyTorch operators (torch.library): `torch.compile` keeps each one a single opaque call
# shaped by its fake implementation, instead of breaking the graph at a Python launch in every layer;
# the gradients are operators too. `kind` picks the family: "kernel" (w: N|1, C, K*K) or "position"
# (w: N|1, G, K*K, H, W), the latter on a tile of POSITION_TILES ("position 32x128"; bare: the default).
@torch.library.custom_op("ablate::triton_aggregate", mutates_args=())
def _aggregate_op(x: torch.Tensor, w: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    if kind == "kernel":
        return _kernel_forward(x, w, k)
    return _position_forward(x, w, k, tile=_tile_name(kind))


@torch.library.custom_op("ablate::triton_aggregate_input_grad", mutates_args=())
def _input_grad_op(gy: torch.Tensor, w: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    if kind == "kernel":
        return _kernel_forward(gy, w.flip(-1), k)  # the transpose of a convolution: the flipped kernel
    return _position_forward(gy, w, k, adjoint=True, tile=_tile_name(kind))


@torch.library.custom_op("ablate::triton_aggregate_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, gy: torch.Tensor, w: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The weights' gradient, shaped and typed as w (summed over the batch for shared weights)."""
    if kind == "kernel":
        return _kernel_weight_grad(x, gy, w.shape, k).to(w.dtype)
    return _position_weight_grad(x, gy, w.shape, k, w.dtype, tile=_tile_name(kind))


@_aggregate_op.register_fake
def _(x, w, k, kind):
    return _out(x)


@_input_grad_op.register_fake
def _(gy, w, k, kind):
    return _out(gy)


@_weight_grad_op.register_fake
def _(x, gy, w, k, kind):
    return w.new_empty(w.shape)


def _save_operands(ctx, inputs, output):
    x, w, k, kind = inputs
    ctx.save_for_backward(x, w)
    ctx.k, ctx.kind = k, kind


def _aggregate_grad(ctx, gy):
    x, w = ctx.saved_tensors
    gx = _input_grad_op(gy, w, ctx.k, ctx.kind) if ctx.needs_input_grad[0] else None
    gw = _weight_grad_op(x, gy, w, ctx.k, ctx.kind) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None


_aggregate_op.register_autograd(_aggregate_grad, setup_context=_save_operands)


def kernel_aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, C, H, W), w (N|1, G, K*K) -> (N, C, H, W): static or homogeneous depth-wise conv."""
    c = x.shape[1]
    wc = w.repeat_interleave(c // w.shape[1], dim=1) if w.shape[1] != c else w
    return _aggregate_op(x, wc.contiguous(), kernel_size, "kernel")


def position_aggregate(x: torch.Tensor, w: torch.Tensor, kernel_size: int,
                       tile: str = DEFAULT_TILE) -> torch.Tensor:
    """x (N, C, H, W), w (N|1, G, K*K, H, W) -> (N, C, H, W): inhomogeneous / locally connected, its
    three kernels on `tile` (POSITION_TILES)."""
    return _aggregate_op(x, w.contiguous(), kernel_size, f"position {tile}")


def _logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits of half-precision maps stay in float32, as accumulated: a softmax follows, and bf16's
    8-bit mantissa would round a logit of 10 by 0.04 (4% of the weight)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@torch.library.custom_op("ablate::triton_correlate", mutates_args=())
def _correlate_op(a: torch.Tensor, b: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    n, _, h, wd = a.shape
    return _position_weight_grad(b, a, (n, groups, k * k, h, wd), k, _logits_dtype(a.dtype))


@_correlate_op.register_fake
def _(a, b, k, groups):
    n, _, h, wd = a.shape
    return a.new_empty((n, groups, k * k, h, wd), dtype=_logits_dtype(a.dtype))


def _save_maps(ctx, inputs, output):
    a, b, k, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.k = k


def _correlate_grad(ctx, grad_logits):
    # logits[i, k] = sum_c a[i, c] b[i + d_k, c]: d a = aggregate(b, dl); d b = the adjoint's scatter of a
    a, b = ctx.saved_tensors
    grad_logits = grad_logits.contiguous()
    ga = _aggregate_op(b, grad_logits, ctx.k, "position") if ctx.needs_input_grad[0] else None
    gb = _input_grad_op(a, grad_logits, ctx.k, "position") if ctx.needs_input_grad[1] else None
    return ga, gb, None, None


_correlate_op.register_autograd(_correlate_grad, setup_context=_save_maps)


def position_correlate(a: torch.Tensor, b: torch.Tensor, kernel_size: int, groups: int) -> torch.Tensor:
    """a, b (N, C, H, W), any strides -> (N, G, K*K, H, W): sum over each group's channels of
    a[n, c, i] * b[n, c, i + d_k], zero outside the map (`functional.sliding_correlate`); float32
    for half-precision maps."""
    return _correlate_op(a, b, kernel_size, groups)
