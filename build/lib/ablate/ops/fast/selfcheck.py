"""Check the Triton kernels against the reference on small shapes: forward, input and weight grads.

    python -m ablate.ops.fast.selfcheck            # on a GPU: the compiled kernels
    TRITON_INTERPRET=1 python -m ablate.ops.fast.selfcheck --device cpu   # anywhere: the interpreter

Prints one line per case and exits 1 if any disagrees. The tests run it (the interpreter in a
subprocess, since TRITON_INTERPRET must be set before Triton compiles the kernels).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ablate.ops.functional import sliding_aggregate, sliding_correlate

__all__ = ["CASES", "TILE_CASES", "CORRELATE_CASES", "WINDOW_CASES", "NEIGHBOURHOOD_CASES", "KERNEL_CHECKS",
           "check_triton",
           "check_correlate", "check_window", "check_neighbourhood"]

# (name, N, C, H, W, K, weight kind, groups, shared over the batch). A weight shared by the batch
# has its gradient summed in chunks of the batch where too few programs would run (on the CPU: fewer
# than 6), so the shared cases cover chunks of one image, uneven chunks and one chunk (exact store).
CASES = [
    ("static", 2, 5, 6, 7, 3, "kernel", 5, True),  # 3 programs: 2 chunks of 1
    ("static-n5", 5, 5, 6, 7, 3, "kernel", 5, True),  # chunks of 3 and 2
    ("static-one-chunk", 2, 70, 4, 5, 3, "kernel", 70, True),  # 3 channel blocks x 3 rows: 9 programs
    ("homogeneous", 2, 6, 5, 6, 3, "kernel", 3, False),
    ("homogeneous-k7", 2, 3, 8, 9, 7, "kernel", 3, False),  # the models' 7 x 7 (rows of 7 of 8 lanes)
    ("inhomogeneous", 2, 6, 6, 5, 3, "position", 2, False),
    ("inhomogeneous-k5", 1, 4, 4, 6, 5, "position", 4, False),
    ("locally_connected", 2, 4, 5, 5, 3, "position", 4, True),  # 1 tile: 2 chunks of 1
    ("locally_connected-n7", 7, 4, 5, 5, 3, "position", 4, True),  # chunks of 2, 2, 2, 1
    ("locally_connected-tiles", 2, 4, 20, 20, 3, "position", 4, True),  # 7 tiles: one chunk
]
# The per-position kernels on their other tiles (triton_dw.POSITION_TILES): (case, tile). Whole maps
# in one tile, a group wider than a tile's channels' share, a batch-shared gradient in chunks.
TILE_CASES = [
    ("inhomogeneous-k5", "32x128"),
    ("locally_connected-n7", "32x128"),
    ("inhomogeneous", "128x64"),
    ("locally_connected-tiles", "128x64"),
]


# Neighbourhood attention's logits (name, N, C, H, W, K, groups): q and k are views of one projection's
# rows (N, H, W, 3C), as the operator hands them over, so the kernel reads strided maps.
CORRELATE_CASES = [
    ("correlate", 2, 6, 5, 6, 3, 2),
    ("correlate-k7-wide", 1, 8, 4, 9, 7, 4),  # the neighbourhood taller than the map
]


# Window aggregation (name, N, C, H, W, window, shift, groups, weights): weights "shared" (1, 1, G, T, T:
# local MLP, a window convolution), "per-window" (1, nW, ..), "per-instance" (N, 1, ..) or "dynamic"
# (N, nW, ..). A shared weight's gradient is summed over every (instance, window) pair in chunks of
# them where too few programs would run (on the CPU: fewer than 6).
WINDOW_CASES = [
    ("window", 2, 8, 6, 6, 3, 0, 2, "shared"),  # the windows tile the map
    ("window-shifted", 2, 8, 6, 6, 3, 1, 2, "shared"),  # roll and region mask
    ("window-padded-shifted", 3, 6, 7, 5, 3, 1, 3, "shared"),  # pad, then roll; 2 channels a group
    ("window-k7", 2, 64, 14, 14, 7, 3, 2, "shared"),  # the models' 7 x 7 (49 of 64 tokens), 32 a group
    ("window-per-window", 2, 4, 6, 6, 3, 1, 2, "per-window"),
    ("window-per-instance", 3, 4, 6, 6, 3, 0, 1, "per-instance"),
    ("window-dynamic", 2, 4, 5, 6, 2, 1, 2, "dynamic"),
    ("window-uneven-chunks", 7, 4, 4, 4, 2, 0, 1, "shared"),  # 28 pairs: 5 chunks of 5, one of 3
    # 80 channels a group: blocks of 64 and 16 (half precision), 32, 32 and 16 (float32)
    ("window-wide-group", 1, 160, 4, 4, 2, 1, 2, "shared"),
]


# Fused neighbourhood attention (name, N, heads, head width, H, W, K, bias): q, k and v views of one
# projection's rows (N, T, 3 * heads * d), as the operator hands them over.
NEIGHBOURHOOD_CASES = [
    ("neighbourhood", 2, 2, 4, 5, 6, 3, True),
    ("neighbourhood-k7-wide", 1, 2, 5, 4, 9, 7, True),  # taller than the map; d not a power of 2
    ("neighbourhood-no-bias", 2, 1, 4, 6, 5, 5, False),
    ("neighbourhood-tiles", 1, 1, 8, 9, 10, 3, True),  # 90 positions: a tile and a ragged one
]


def _relative_error(pairs) -> float:
    err = 0.0
    for got, want in pairs:
        got, want = got.detach().double().cpu(), want.detach()
        err = max(err, ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return err


def _reference(x, w, k, kind):
    n, c, h, wd = x.shape
    g = w.shape[1]
    if kind == "kernel":  # the per-position form of a kernel: tie it over positions
        w = w[..., None, None].expand(*w.shape, h, wd)
    return sliding_aggregate(x.reshape(n, g, c // g, h, wd), w, k).reshape(n, c, h, wd)


def _with_tiles(cases, tile_cases):
    """Each case on the default tile, then the tile cases: (name, tile, case's fields)."""
    by_name = {case[0]: case for case in cases}
    yield from ((case[0], None, case[1:]) for case in cases)
    yield from ((f"{name} {tile}", tile, by_name[name][1:]) for name, tile in tile_cases)


def check_triton(device: str = "cuda", dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 cases=CASES, tile_cases=TILE_CASES) -> dict[str, float]:
    """Largest relative error of each case (forward, grad x, grad w together)."""
    from ablate.ops.fast import triton_dw

    errors = {}
    for name, tile, (n, c, h, wd, k, kind, g, shared) in _with_tiles(cases, tile_cases):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, wd, generator=gen)
        wshape = (1 if shared else n, g, k * k) + ((h, wd) if kind == "position" else ())
        w = torch.randn(wshape, generator=gen)
        gy = torch.randn(n, c, h, wd, generator=gen)
        ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
        ref_y = _reference(ref_x, ref_w, k, kind)
        ref_y.backward(gy.double())

        fx = x.to(device, dtype)
        if channels_last:
            fx = fx.contiguous(memory_format=torch.channels_last)
        fx.requires_grad_()
        fw = w.to(device, dtype).requires_grad_()
        if kind == "kernel":
            y = triton_dw.kernel_aggregate(fx, fw, k)
        else:
            y = triton_dw.position_aggregate(fx, fw, k, tile or triton_dw.DEFAULT_TILE)
        y.backward(gy.to(device, dtype))
        errors[name] = _relative_error(((y, ref_y), (fx.grad, ref_x.grad), (fw.grad, ref_w.grad)))
    return errors


def check_correlate(device: str = "cuda", dtype: torch.dtype = torch.float32,
                    cases=CORRELATE_CASES) -> dict[str, float]:
    """`triton_dw.position_correlate` against `sliding_correlate`: logits and both maps' gradients."""
    from ablate.ops.fast import triton_dw

    errors = {}
    for name, n, c, h, wd, k, g in cases:
        gen = torch.Generator().manual_seed(2)
        rows = torch.randn(n, h, wd, 3 * c, generator=gen)
        gl = torch.randn(n, g, k * k, h, wd, generator=gen)
        ref = rows.double().requires_grad_()
        a, b = (ref[..., i * c:(i + 1) * c].permute(0, 3, 1, 2).reshape(n, g, c // g, h, wd) for i in (0, 1))
        ref_l = sliding_correlate(a, b, k)
        ref_l.backward(gl.double())

        fast = rows.to(device, dtype).requires_grad_()
        fa, fb = (fast[..., i * c:(i + 1) * c].permute(0, 3, 1, 2) for i in (0, 1))
        logits = triton_dw.position_correlate(fa, fb, k, g)
        logits.backward(gl.to(device, dtype))
        errors[name] = _relative_error(((logits, ref_l), (fast.grad, ref.grad)))
    return errors


def check_window(device: str = "cuda", dtype: torch.dtype = torch.float32,
                 cases=WINDOW_CASES) -> dict[str, float]:
    """`triton_window.window_aggregate` against `WindowLayout.aggregate`: output and both gradients."""
    from ablate.ops.fast import triton_window
    from ablate.ops.layouts import WindowLayout

    errors = {}
    for name, n, c, h, wd, k, shift, g, weights in cases:
        layout = WindowLayout((h, wd), (k, k), (shift, shift))
        t = layout.tokens
        wshape = {"shared": (1, 1), "per-window": (1, layout.num_windows), "per-instance": (n, 1),
                  "dynamic": (n, layout.num_windows)}[weights] + (g, t, t)
        gen = torch.Generator().manual_seed(3)
        x, w, gy = (torch.randn(shape, generator=gen) for shape in ((n, c, h, wd), wshape, (n, c, h, wd)))
        ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
        ref_y = layout.aggregate(ref_x, ref_w)
        ref_y.backward(gy.double())

        fx = x.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        fw = w.to(device).requires_grad_()
        y = triton_window.window_aggregate(layout.to(device), fx, fw)
        y.backward(gy.to(device, dtype))
        errors[name] = _relative_error(((y, ref_y), (fx.grad, ref_x.grad), (fw.grad, ref_w.grad)))
    return errors


def _heads(rows: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """q, k, v (N, G, T, d): views of one projection's rows (N, T, 3 * G * d); shape (N, T, 3, G, d)."""
    return rows.view(shape).permute(2, 0, 3, 1, 4).unbind(0)


def check_neighbourhood(device: str = "cuda", dtype: torch.dtype = torch.float32,
                        cases=NEIGHBOURHOOD_CASES) -> dict[str, float]:
    """`triton_neighbourhood.neighbourhood_attention` against the reference operator (the logits in
    memory through `sliding_correlate`, softmax and `sliding_aggregate`): output, the projection's
    gradient (q, k and v together) and the bias's."""
    from ablate.ops.fast import triton_neighbourhood
    from ablate.ops.fast.wide_attention import logits_in_memory
    from ablate.ops.layouts import SlidingLayout

    errors = {}
    for name, n, g, d, h, wd, k, bias in cases:
        layout = SlidingLayout((h, wd), k)
        gen = torch.Generator().manual_seed(4)
        rows = torch.randn(n, h * wd, 3 * g * d, generator=gen)
        table = torch.randn(g, k * k, generator=gen) if bias else None
        gy = torch.randn(n, g, h * wd, d, generator=gen).to(dtype)

        shape = (n, h * wd, 3, g, d)
        # the reference from the inputs as stored (bf16-rounded q and k move the softmax more than the
        # kernels' own rounding does)
        ref = [rows.to(dtype).double().requires_grad_()] + ([table.double().requires_grad_()] if bias else [])
        ref_y = logits_in_memory(layout, *_heads(ref[0], shape), ref[1] if bias else None)
        ref_grads = torch.autograd.grad(ref_y, ref, gy.double())

        for halo in (False, True):  # the offset-walking kernels, the tensor cores' halo tiles
            fast = [rows.to(device, dtype).requires_grad_()]
            fast += [table.to(device).requires_grad_()] if bias else []
            fast_table = fast[1] if bias else None
            y = triton_neighbourhood.neighbourhood_attention(*_heads(fast[0], shape), fast_table, (h, wd), k,
                                                             halo=halo)
            grads = torch.autograd.grad(y, fast, gy.to(device))
            errors[name + (" halo" if halo else "")] = _relative_error(zip((y, *grads), (ref_y, *ref_grads)))
    return errors


def _check_neighbourhood_operator(device: str) -> float:
    """The fused kernels as PyTorch operators: `opcheck`, then compiled (fullgraph, the eager backend's
    tracing: what the other families' check tests of them) against eager."""
    from ablate.ops.fast import triton_neighbourhood

    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(2, 20, 24, generator=gen).to(device).requires_grad_()
    table = torch.randn(2, 9, generator=gen).to(device).requires_grad_()
    shape = (2, 20, 3, 2, 4)
    outs = []
    for halo in (False, True):
        torch.library.opcheck(triton_neighbourhood._forward_op, (*_heads(rows, shape), table, 4, 5, 3, halo))

        def step(rows, table, halo=halo):
            y = triton_neighbourhood.neighbourhood_attention(*_heads(rows * 2, shape), table, (4, 5), 3, halo)
            return (y + 1).square()

        for f in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
            y = f(rows, table)
            outs.append((y, *torch.autograd.grad(y.sum(), (rows, table))))
    # each kernel compiled against itself eager, and the halo kernels against the offsets'
    return max(_relative_error(zip(outs[0], [t.double().cpu() for t in other])) for other in outs[1:])


def check_operators(device: str = "cuda", backend: str = "inductor") -> dict[str, float]:
    """The kernels as PyTorch operators: `torch.library.opcheck` (schema, fake shapes and strides,
    autograd registration), then each family inside `torch.compile(fullgraph=True)` (no graph break)
    against the eager call, forward and both gradients. Largest relative error per family."""
    from ablate.ops.fast import triton_dw, triton_window
    from ablate.ops.layouts import WindowLayout

    window = WindowLayout((5, 6), (3, 3), (1, 1)).to(device)  # padded to 6 x 6, shifted: 4 windows of 9
    errors = {}
    families = (  # (name, the operator, the second operand's shape, its extra arguments, the function)
        ("kernel", triton_dw._aggregate_op, (2, 4, 9), (3, "kernel"),
         lambda x, w: triton_dw.kernel_aggregate(x, w, 3)),
        ("position", triton_dw._aggregate_op, (2, 4, 9, 5, 6), (3, "position"),
         lambda x, w: triton_dw.position_aggregate(x, w, 3)),
        ("correlate", triton_dw._correlate_op, (2, 4, 5, 6), (3, 2),
         lambda x, w: triton_dw.position_correlate(x, w, 3, 2)),
        ("window", triton_window._window_op, (1, 4, 2, 9, 9), ([3, 3, 1, 1],),
         lambda x, w: triton_window.window_aggregate(window, x, w)),
    )
    for name, op, shape, extra, fn in families:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 5, 6, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        w = torch.randn(shape, generator=gen).to(device)
        if w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(op, (x.requires_grad_(), w.requires_grad_(), *extra))

        def step(x, w, fn=fn):
            return (fn(x * 2, w) + 1).square()

        compiled = torch.compile(step, fullgraph=True, backend=backend)
        outs = []
        for f in (step, compiled):
            y = f(x, w)
            outs.append((y, *torch.autograd.grad(y.sum(), (x, w))))
        errors[f"compiled {name}"] = _relative_error(zip(outs[0], [t.double().cpu() for t in outs[1]]))
    errors["compiled neighbourhood"] = _check_neighbourhood_operator(device)
    return errors


# The Triton kernels' families, each check(device, dtype) -> {case: error} (`python -m ablate.gpu_compile`
# compiles what they launch for a GPU); `check_operators` adds their operators, compiled.
KERNEL_CHECKS = (check_triton, check_correlate, check_window, check_neighbourhood)


def _check_device(parser: argparse.ArgumentParser, name: str) -> None:
    """A device this machine can run the kernels on, else argparse's line and exit 2 before any kernel
    (this layer cannot reach ablate.cli): a traceback from torch.cuda or Triton's driver would read, in
    gpu_check's report, as a failing case."""
    cpu_form = "TRITON_INTERPRET=1 python -m ablate.ops.fast.selfcheck --device cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: the selfcheck runs on cuda, cuda:<index> or cpu (Triton's "
                     "interpreter)")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
            parser.error(f"--device {name} runs the kernels through Triton's interpreter: {cpu_form}")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        parser.error(f"--device {name}, but PyTorch sees no CUDA GPU on this machine; on a CPU: {cpu_form}")
    if device.index is not None and device.index >= count:
        parser.error(f"--device {name}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablate.ops.fast.selfcheck",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    dtype = getattr(torch, args.dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # on the CPU (the interpreter) compile without inductor's codegen: the check is the tracing
    backend = "inductor" if args.device.startswith("cuda") else "aot_eager"
    families = [lambda check=check: check(args.device, dtype) for check in KERNEL_CHECKS]
    families.append(lambda: check_operators(args.device, backend))
    errors = {}
    for family in families:  # printed family by family: a check stopped by a time limit keeps them
        found = family()
        for name, err in found.items():
            print(f"{name:20s} max relative error {err:.2e} {'ok' if err <= tol else 'FAIL'}", flush=True)
        errors.update(found)
    return 0 if all(e <= tol for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
