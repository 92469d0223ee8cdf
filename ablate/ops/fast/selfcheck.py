"""Check the Triton kernels against the reference on small shapes: forward, input and weight grads.

    python -m ablate.ops.fast.selfcheck            # on a GPU: the compiled kernels
    TRITON_INTERPRET=1 python -m ablate.ops.fast.selfcheck --device cpu   # anywhere: the interpreter

Prints one line per case and exits 1 if any disagrees. The tests run it (the interpreter in a
subprocess, since TRITON_INTERPRET must be set before Triton compiles the kernels).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ablate.ops.functional import sliding_aggregate, sliding_correlate

__all__ = ["CASES", "TILE_CASES", "CORRELATE_CASES", "check_triton", "check_correlate"]

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


def check_operators(device: str = "cuda", backend: str = "inductor") -> dict[str, float]:
    """The kernels as PyTorch operators: `torch.library.opcheck` (schema, fake shapes and strides,
    autograd registration), then each family inside `torch.compile(fullgraph=True)` (no graph break)
    against the eager call, forward and both gradients. Largest relative error per family."""
    from ablate.ops.fast import triton_dw

    errors = {}
    families = (  # (name, the operator, its function, the second operand's shape, extra arguments)
        ("kernel", triton_dw._aggregate_op, triton_dw.kernel_aggregate, (2, 4, 9), (3, "kernel")),
        ("position", triton_dw._aggregate_op, triton_dw.position_aggregate, (2, 4, 9, 5, 6), (3, "position")),
        ("correlate", triton_dw._correlate_op, triton_dw.position_correlate, (2, 4, 5, 6), (3, 2)),
    )
    for name, op, fn, shape, extra in families:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 5, 6, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        w = torch.randn(shape, generator=gen).to(device)
        if w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(op, (x.requires_grad_(), w.requires_grad_(), *extra))

        def step(x, w, fn=fn, arg=extra[1] if name == "correlate" else None):
            y = fn(x * 2, w, 3) if arg is None else fn(x * 2, w, 3, arg)
            return (y + 1).square()

        compiled = torch.compile(step, fullgraph=True, backend=backend)
        outs = []
        for f in (step, compiled):
            y = f(x, w)
            outs.append((y, *torch.autograd.grad(y.sum(), (x, w))))
        errors[f"compiled {name}"] = _relative_error(zip(outs[0], [t.double().cpu() for t in outs[1]]))
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    errors = check_triton(args.device, dtype)
    errors.update(check_correlate(args.device, dtype))
    # on the CPU (the interpreter) compile without inductor's codegen: the check is the tracing
    errors.update(check_operators(args.device, "inductor" if args.device.startswith("cuda") else "aot_eager"))
    for name, err in errors.items():
        print(f"{name:20s} max relative error {err:.2e} {'ok' if err <= tol else 'FAIL'}")
    return 0 if all(e <= tol for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
