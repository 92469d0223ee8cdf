"""Compile the Triton kernels for a GPU this machine does not have: whether each compiles and fits
that GPU, and what it costs the compiler, known before a GPU is lent.

Triton's interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic on the CPU, but it is not
Triton's compiler: a kernel it runs can still fail to compile for a GPU (a tile shape or dtype the
tensor cores refuse), or compile into one that the GPU cannot launch (more shared memory or
registers than a block may have). While a `TargetCompiler` holds, a launch of any `triton.jit`
kernel is specialised as Triton's launcher specialises it (the arguments' dtypes, 16-byte alignment,
integers equal to 1; Triton's own binder), compiled for the target by Triton's compiler and ptxas
(bundled with Triton: no GPU, driver or CUDA toolkit needed), and not run: what it would have
written stays as allocated, so only shapes mean anything while it holds. Each specialisation is
compiled once; `builds` lists them with their compile time, shared memory and registers.

It uses two of Triton's internals, the ones `JITFunction.run` itself calls to specialise a launch
(`create_function_from_signature`, `JITFunction._pack_args`): the same in Triton 3.6 (the GPU
image's) and 3.8 (the pinned one); a Triton that changed them fails here with the version named.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

__all__ = ["LIMITS", "Build", "TargetCompiler"]

# Per-block limits of each compute capability (CUDA C Programming Guide, "Technical Specifications
# per Compute Capability"): the most shared memory a block may opt into, in bytes, and the 32-bit
# registers of a block (a kernel of more fails to launch with "out of resources").
LIMITS = {
    80: (166912, 65536),  # A100
    86: (101376, 65536),
    89: (101376, 65536),  # L4, L40
    90: (232448, 65536),  # H100, H200
    100: (232448, 65536),  # B200
    120: (101376, 65536),
}


@dataclass
class Build:
    """One kernel specialisation compiled for the target."""

    kernel: str
    constants: dict[str, object]  # the constexpr parameters and the integers specialised to 1
    signature: str  # the pointers' element types, in order
    aligned: str  # the integers specialised as multiples of 16 (pointers: 16-byte aligned, as a rule)
    seconds: float = 0.0  # Triton's compile, ptxas's included (0 where Triton's cache had it)
    shared_bytes: int = 0
    registers: int | None = None  # per thread (cuobjdump's resource usage)
    stack_bytes: int | None = None  # per thread: the stack frame, where registers that do not fit spill
    num_warps: int = 0
    launches: int = 0
    error: str | None = None

    def problems(self, arch: int) -> list[str]:
        """Why the target GPU would refuse this kernel: its compile error, or a limit it exceeds."""
        if self.error:
            return [self.error]
        shared, registers = LIMITS[arch]
        found = []
        if self.shared_bytes > shared:
            found.append(f"{self.shared_bytes} bytes of shared memory, sm_{arch} allows {shared} a block")
        if self.registers is not None and self.registers * 32 * self.num_warps > registers:
            found.append(f"{self.registers} registers x {32 * self.num_warps} threads, sm_{arch} has "
                         f"{registers} a block")
        return found


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread of a cubin's one kernel, from cuobjdump; None where it
    cannot say. (ptxas -v reports a kernel's spills as its stack frame, which cuobjdump's STACK is.)"""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


class TargetCompiler:
    """While it holds (a context manager), Triton launches compile for `sm_<arch>` instead of
    running (see the module's docstring)."""

    def __init__(self, arch: int = 90):
        if arch not in LIMITS:
            raise ValueError(f"sm_{arch}: no limits known; one of {sorted(LIMITS)}")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted, not compiled; unset it")
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.builds: dict[tuple, Build] = {}
        self._binders: dict[object, object] = {}
        self._run = None

    def __enter__(self) -> TargetCompiler:
        compiler = self
        self._run = jit.JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            compiler.launch(fn, args, kwargs)

        jit.JITFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        jit.JITFunction.run = self._run

    def launch(self, fn: jit.JITFunction, args: tuple, kwargs: dict) -> Build:
        """Specialise one launch as Triton's launcher would, and compile it if it is new."""
        kwargs = dict(kwargs)
        # what JITFunction.run adds before binding, so that the options (the cache key) are its
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        try:
            binder = self._binders.get(fn)
            if binder is None:
                binder = self._binders[fn] = jit.create_function_from_signature(fn.signature, fn.params,
                                                                               self.backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization,
                                                                  options)
        except (AttributeError, TypeError) as err:
            raise RuntimeError(f"Triton {triton.__version__}'s launcher internals differ from the ones "
                               f"this compiler was written against (3.6, 3.8): {err}") from err
        key = (fn.cache_key, repr(specialization), repr(sorted(options.__dict__.items())))
        build = self.builds.get(key)
        if build is None:
            names = fn.arg_names
            build = self.builds[key] = Build(
                kernel=fn.__name__,
                constants={names[path[0]]: value for path, value in constexprs.items()},
                signature=", ".join(kind for kind in signature.values() if kind.startswith("*")),
                aligned=" ".join(names[path[0]] for path, hints in attrs.items()
                                 if hints and not signature[names[path[0]]].startswith("*")))
            self._compile(build, ASTSource(fn, signature, constexprs, attrs), options)
        build.launches += 1
        return build

    def _compile(self, build: Build, source: ASTSource, options) -> None:
        started = time.perf_counter()
        try:
            kernel = triton.compile(source, target=self.target, options=options.__dict__)
        except Exception as err:  # noqa: BLE001  a kernel the GPU's compiler refuses is the finding
            lines = str(err).strip().splitlines()  # a CompilationError ends with what was refused
            build.error = f"{type(err).__name__}: {lines[-1] if lines else ''}"
            return
        finally:
            build.seconds = time.perf_counter() - started
        build.shared_bytes = kernel.metadata.shared
        build.num_warps = kernel.metadata.num_warps
        build.registers, build.stack_bytes = _resources(kernel.asm["cubin"])

    def problems(self) -> list[tuple[Build, str]]:
        """Every build the target would refuse, with why."""
        return [(b, why) for b in self.builds.values() for why in b.problems(self.arch)]
