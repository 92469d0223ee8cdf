"""Which path computes an operator on a GPU: the fastest of its candidates, timed once per shape.

On a GPU the fastest way to apply sliding weights depends on their form, the shape and the GPU. One
H200 (bf16, batch 128, tiny stages 1-2, forward and both gradients) measured static weights 4.5x
faster through cuDNN's channels_last depth-wise kernels than NCHW and 6.7x faster than ablate's
Triton kernel; per-instance kernels faster through the batch-folded conv (6.0 ms) than Triton (8.7);
per-position weights faster through Triton (36 ms) than the reference (45): a different winner per
form, each measured once, on one GPU, at one size. Instead of a table of those winners, a form's
candidates are timed at the first eager call of a shape (forward and both gradients, on random
tensors of the call's shapes, dtype and strides) and the fastest is kept: in memory, and in a JSON
file per machine (`ABLATE_ROUTES`, default ~/.cache/ablate/routes.json, keyed by the GPU's name and
PyTorch's version) that other processes (a sweep's jobs, the bench's compiling processes) read
instead of timing again. Every candidate computes the same operator (tests/test_fast_paths.py holds
each to the reference): the choice changes speed and float rounding, nothing else.

A form is an operator with one kind of operands: the layouts' weight forms (`CANDIDATES` here,
applied by `aggregate`: the depth-wise family's three and window matrices), and forms other modules
`register` (neighbourhood and global attention's cores, `wide_attention.py`; the blocks' 1x1
convolutions, `models/blocks.py`). A shape is the operands' shapes, strides and dtype and the
layout's geometry (its `extra_repr`; None where the operands say it all). A candidate is a function
(layout, *operands) -> output whose tensor operands all get gradients.

Under `torch.compile` the routing is traced as a lookup: a shape that an eager call of this process
routed takes that route, any other the form's first candidate (no file read or timing while
tracing); `prepare` runs one eager step of a model first so that its compiled form finds every route
chosen. `ABLATE_TUNE_ROUTES=0` turns the timing off (every form takes its first candidate). On the
CPU the routes are fixed (`ablate.ops.fast`'s table): timing there is noisy, and fixed routes keep
CPU runs reproducible.

`rehearsing` routes a model's calls as a GPU would and runs each shape's candidates once instead of
timing them: on a GPU, processes that compile every kernel in parallel before one process times
(the bench's prewarm); off a GPU, under `triton_target.TargetCompiler`, the Triton kernels compiled
for a GPU this machine does not have (`python -m ablate.gpu_compile`).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CANDIDATES", "MAX_WINDOW_TOKENS", "GPU_DTYPES", "register", "runnable", "form_of", "routed",
           "aggregate", "run", "choose", "forced", "Rehearsal", "rehearsing", "used", "timing_seconds",
           "forget_used", "prepare", "folded_channels_last", "depthwise_conv_channels_last",
           "unfold_multiply_sum"]

log = logging.getLogger(__name__)

# One candidate: (layout, *operands) -> output. The depth-wise forms' operands are x (N, C, H, W) and
# w as the sliding layout receives it; an operand may be None (an absent bias).
Candidate = Callable[..., torch.Tensor]


def depthwise_conv_channels_last(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, C, H, W), w (1, G, K*K) -> a depth-wise convolution computed in channels_last.

    The result stays channels_last: the 1x1 convolutions and norms around it accept either format,
    and converting back would cost a copy of the map.
    """
    c = x.shape[1]
    kernel = w[0].repeat_interleave(c // w.shape[1], dim=0).reshape(c, 1, kernel_size, kernel_size)
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, kernel.to(x.dtype), padding=kernel_size // 2, groups=c)


def folded_channels_last(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, C, H, W), w (N, G, K*K) -> per-instance depth-wise convolution as one grouped conv over
    an NHWC map of one image with N*C channels (memory order h, w, n, c): cuDNN's channels_last
    depth-wise kernels, at the price of two permuting copies of the map."""
    n, c, h, wd = x.shape
    kernel = w.repeat_interleave(c // w.shape[1], dim=1).reshape(n * c, 1, kernel_size, kernel_size)
    folded = x.permute(2, 3, 0, 1).reshape(h, wd, n * c).permute(2, 0, 1)[None]
    y = F.conv2d(folded, kernel.to(x.dtype), padding=kernel_size // 2, groups=n * c)
    return y[0].permute(1, 2, 0).reshape(h, wd, n, c).permute(2, 3, 0, 1)


_TRITON = importlib.util.find_spec("triton") is not None  # the Triton candidates need it


def unfold_multiply_sum(x: torch.Tensor, w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x (N, C, H, W), w (N|1, G, K*K, H, W) -> y: involution's plain form, every neighbourhood
    unfolded (K*K copies of the map), multiplied and summed; on an H200 within 6% of the Triton
    kernel at tiny stage 1 (38 ms against 36, forward and both gradients)."""
    n, c, h, wd = x.shape
    g = w.shape[1]
    cols = F.unfold(x, kernel_size, padding=kernel_size // 2).view(n, g, c // g, kernel_size ** 2, h, wd)
    return (cols * w[:, :, None]).sum(3).view(n, c, h, wd)


def _reference(layout, x, w):
    return layout.aggregate(x, w)


def _triton_kernel(layout, x, w):
    from ablate.ops.fast import triton_dw  # a GPU's (compiles at first call)

    return triton_dw.kernel_aggregate(x, w, layout.kernel_size)


def _triton_window(layout, x, w):
    from ablate.ops.fast import triton_window  # a GPU's (compiles at first call)

    return triton_window.window_aggregate(layout, x, w)


# The largest window the Triton window kernels take (`triton_window.MAX_TOKENS`, which imports Triton:
# tests/test_routes.py holds the two equal). A bigger window (a global layout of a big map) is one
# large GEMM for the reference already.
MAX_WINDOW_TOKENS = 64


def _triton_position(tile: str) -> Candidate:
    """The Triton per-position kernels on one of `triton_dw.POSITION_TILES`."""
    def candidate(layout, x, w):
        from ablate.ops.fast import triton_dw

        return triton_dw.position_aggregate(x, w, layout.kernel_size, tile)
    return candidate


# Each form's candidates; the first is taken where nothing was timed (under compile, or with timing
# off): for the depth-wise forms the one a GPU measured fastest before timing existed. Candidates
# whose name starts with "triton" need Triton.
CANDIDATES: dict[str, dict[str, Candidate]] = {
    "static": {
        "cudnn channels_last": lambda layout, x, w: depthwise_conv_channels_last(x, w, layout.kernel_size),
        "triton kernel": _triton_kernel,
    },
    "per-instance": {
        "batch-folded conv": _reference,
        "batch-folded conv channels_last": lambda layout, x, w: folded_channels_last(x, w,
                                                                                      layout.kernel_size),
        "triton kernel": _triton_kernel,
    },
    "per-position": {
        "triton": _triton_position("64x32"),
        "triton 32x128": _triton_position("32x128"),
        "triton 128x64": _triton_position("128x64"),
        "shift-and-accumulate": _reference,
        "unfold-multiply-sum": lambda layout, x, w: unfold_multiply_sum(x, w, layout.kernel_size),
    },
    # window matrices (N|1, nW|1, G, T, T) of a WindowLayout: the reference cuts the map into windows
    # and back (copies of the map, each pass); the Triton kernels address the windows in place
    "windowed": {
        "einsum on windows": _reference,
        "triton on windows": _triton_window,
    },
}


def form_of(layout, w: torch.Tensor) -> str:
    """The weights' form: window matrices of a windowed layout; of a sliding one static (1, G, K*K),
    per-instance (N, G, K*K) or per-position (.., H, W)."""
    if layout.kind == "windowed":
        return "windowed"
    if w.dim() == 5:
        return "per-position"
    return "static" if w.shape[0] == 1 else "per-instance"


def register(form: str, table: dict[str, Candidate]) -> None:
    """Add a form and its candidates (first: the default where nothing was timed)."""
    CANDIDATES[form] = table


# The dtypes the GPU paths take; float64 (the exact checks) keeps the reference everywhere.
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def routed(x: torch.Tensor) -> bool:
    """Whether an operator on `x` goes through the routes: on a GPU in a GPU path's dtype, or on any
    device while `rehearsing` holds."""
    return x.dtype in GPU_DTYPES and (x.is_cuda or _rehearsal is not None)


def runnable(form: str) -> list[str]:
    """The form's candidates this machine can run, in the table's order; the first is its default."""
    return [name for name in CANDIDATES[form] if _TRITON or not name.startswith("triton")]


_chosen: dict[str, str] = {}  # key -> candidate, this process (from timing or the file)
_used: dict[str, str] = {}  # key -> candidate, the calls of this process
# the choices by the call's shapes (ints and strings only): what a step's layers, and compiled code
# while it is traced, look up without building a key, reading the file or timing
_calls: dict[tuple, str] = {}
_call_keys: dict[tuple, str] = {}
_forced: dict[str, str] = {}  # form -> candidate, while `forced` holds (the bench, the tests)
_timing_s = 0.0  # wall seconds this process spent timing (candidates' compiles included)
_loaded = False
_rehearsal: Rehearsal | None = None  # while `rehearsing` holds


def _file() -> Path:
    return Path(os.environ.get("ABLATE_ROUTES") or Path.home() / ".cache" / "ablate" / "routes.json")


def _describe(t: torch.Tensor | None) -> str:
    """An operand's shape and memory layout (its strides where it is not a dense NCHW or NHWC)."""
    if t is None:
        return "none"
    if t.is_contiguous():
        layout = "contiguous"
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    else:
        layout = f"strides {tuple(t.stride())}"
    return f"{tuple(t.shape)} {layout}"


def _first(operands: tuple) -> torch.Tensor:
    return next(t for t in operands if t is not None)


def _geometry(layout) -> str:
    """What a shape's key adds to the operands' shapes: the layout's geometry (none where the
    operands' shapes say it all, as a 1x1 convolution's)."""
    return "" if layout is None else layout.extra_repr()


def _key(form: str, layout, operands: tuple) -> str:
    x = _first(operands)
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else str(x.device)
    parts = [device, f"torch {torch.__version__}", form, *(_describe(t) for t in operands), _geometry(layout),
             str(x.dtype).removeprefix("torch.")]
    return " | ".join(part for part in parts if part)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    _chosen.update({k: v for k, v in _read(_file()).items() if k not in _chosen})


def _read(path: Path) -> dict:
    """The file's choices; nothing where it is missing, unreadable or not a JSON object (a damaged
    file only costs the timing again, and the next choice rewrites it whole)."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _save(key: str, name: str) -> None:
    """Add one choice to the file: read, merge, replace atomically (other processes write it too)."""
    path = _file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = _read(path)
        known[key] = name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".routes-")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the choice holds for this process only
        log.debug("routes: could not write %s: %s", path, err)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _aside(device: torch.device):
    """Timing or a prepared step leaves the run as it found it: the random streams are restored (a
    run whose routes are already on file draws the same dropout as one that times them), and the
    peak-memory statistic restarts after it (its candidates' memory is not the model's; the steps
    after reach the model's own peak again)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _tunable(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("ABLATE_TUNE_ROUTES", "1") != "0"


def _random_like(t: torch.Tensor) -> torch.Tensor:
    """A random tensor with t's shape, dtype, device and strides (a view's gaps and overlaps too)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return torch.randn(extent, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride())


Step = Callable[[], None]


def _first_calls(form: str, layout, operands: tuple, names: list[str],
                 gradients: bool = True) -> tuple[dict[str, Step], dict[str, str]]:
    """One forward and every operand's gradient (or the forward alone) of each named candidate, on
    random tensors shaped, typed and strided as the call's (this compiles a Triton or FlexAttention
    kernel): the steps that ran, to run again, and the error of each that failed."""
    inputs = tuple(None if t is None else _random_like(t).requires_grad_(gradients) for t in operands)
    leaves = [t for t in inputs if t is not None]
    steps, failed = {}, {}
    for name in names:
        def step(candidate=CANDIDATES[form][name]):
            y = candidate(layout, *inputs)
            if gradients:
                torch.autograd.grad(y, leaves, torch.ones_like(y))
        try:
            step()
        except Exception as err:  # noqa: BLE001  a candidate that cannot run this shape is no choice
            failed[name] = f"{type(err).__name__}: {err}"
            continue
        steps[name] = step
    return steps, failed


def _time_candidates(form: str, layout, operands: tuple, rounds: int = 5) -> dict[str, float]:
    """Median seconds of a forward and every operand's gradient of each candidate, on random tensors
    shaped, typed and strided as the call's; interleaved rounds after one untimed call each (which
    compiles a Triton or FlexAttention kernel). A candidate that fails (a shape its kernel refuses,
    a GPU its kernel's configurations do not fit) is left out."""
    steps, failed = _first_calls(form, layout, operands, runnable(form))
    for name, err in failed.items():
        log.warning("routes: %s cannot run %s %s: %s", name, form, _describe(_first(operands)), err)
    device = _first(operands).device
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_measure(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _call(form: str, layout, operands: tuple) -> tuple:
    x = _first(operands)
    shapes = tuple(None if t is None else (tuple(t.shape), tuple(t.stride())) for t in operands)
    return (form, _geometry(layout), shapes, x.dtype, x.device)


def choose(form: str, layout, *operands: torch.Tensor | None) -> str:
    """The candidate that computes `form` on these operands (see the module's docstring)."""
    if form in _forced:
        return _forced[form]
    call = _call(form, layout, operands)
    if torch.compiler.is_compiling():  # traced: a lookup only, the choice of an eager call before
        return _calls.get(call, runnable(form)[0])
    if _rehearsal is not None:
        return _rehearsal.choose(form, layout, operands)
    if call in _calls:
        _used[_call_keys[call]] = _calls[call]
        return _calls[call]
    x = _first(operands)
    key = _key(form, layout, operands)
    _load()
    name = _chosen.get(key)
    if name not in runnable(form):  # not timed yet (or a name another version or machine wrote)
        name = runnable(form)[0]
        if torch.is_inference_mode_enabled():  # no gradient to time with: a later call decides
            _used[key] = name
            return name
        if _tunable(x):
            global _timing_s
            started = time.perf_counter()
            with torch.enable_grad(), _aside(x.device):
                seconds = _time_candidates(form, layout, operands)
            spent = time.perf_counter() - started
            _timing_s += spent
            if seconds:
                name = min(seconds, key=seconds.get)
                log.info("routes: %s -> %s (%s; timed in %.1f s)", key, name,
                         ", ".join(f"{n} {1e3 * s:.2f} ms" for n, s in seconds.items()), spent)
                _chosen[key] = name
                _save(key, name)
    _used[key] = name
    _calls[call], _call_keys[call] = name, key
    return name


def run(form: str, layout, *operands: torch.Tensor | None) -> torch.Tensor:
    """`form` on these operands through the chosen candidate. A choice made without trying it (the
    default under inference mode or with timing off) that fails on these operands falls back, in
    eager code, to the form's next candidates; the one that runs is kept for the call's shapes (what
    compiled code then looks up). Where every candidate fails, the chosen one's error is raised."""
    name = choose(form, layout, *operands)
    if torch.compiler.is_compiling():
        return CANDIDATES[form][name](layout, *operands)
    try:
        return CANDIDATES[form][name](layout, *operands)
    except Exception as first_error:  # noqa: BLE001  a kernel that refuses this call is no choice
        for other in (n for n in runnable(form) if n != name):
            try:
                y = CANDIDATES[form][other](layout, *operands)
            except Exception:  # noqa: BLE001, S112  the next one, then the first error
                continue
            log.warning("routes: %s failed on %s %s (%s: %s); %s ran it instead", name, form,
                        _describe(_first(operands)), type(first_error).__name__, first_error, other)
            call, key = _call(form, layout, operands), _key(form, layout, operands)
            _calls[call], _call_keys[call], _used[key] = other, key, other
            return y
        raise


def aggregate(layout, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`layout.aggregate(x, w)` through the chosen candidate."""
    return run(form_of(layout, w), layout, x, w)


@contextlib.contextmanager
def forced(form: str, name: str):
    """Every call of `form` takes candidate `name` while this holds (nothing timed or recorded): the
    bench times each candidate in a model, the GPU tests check each against the reference."""
    if name not in CANDIDATES[form]:
        raise KeyError(f"{form!r} has no candidate {name!r}: one of {list(CANDIDATES[form])}")
    before = _forced.get(form)
    _forced[form] = name
    try:
        yield
    finally:
        if before is None:
            _forced.pop(form)
        else:
            _forced[form] = before


class Rehearsal:
    """What `rehearsing` saw: each routed shape (its key) with the candidates that ran on it, and the
    error of each that failed."""

    def __init__(self, fake_gpu: bool = False) -> None:
        self.fake_gpu = fake_gpu
        self.ran: dict[str, list[str]] = {}
        self.failed: dict[str, dict[str, str]] = {}

    def choose(self, form: str, layout, operands: tuple) -> str:
        """Run the form's candidates once on this shape (the first time it is seen): on a GPU every
        one, off it the Triton ones (the others are PyTorch's operators: nothing to compile), on a
        fake GPU every one but FlexAttention's, forward only. The call itself takes the form's first
        candidate that did not fail (off a real GPU, that needs no FlexAttention: inductor generates
        its kernels for the GPU it runs on)."""
        key = _key(form, layout, operands)
        gpu = _first(operands).is_cuda and not self.fake_gpu
        # (inference mode has no gradients to run; a training step's call of the shape runs them)
        if key not in self.ran and key not in self.failed and not torch.is_inference_mode_enabled():
            if self.fake_gpu:  # FlexAttention's kernels are inductor's, generated on a real GPU
                names = [name for name in runnable(form) if not name.startswith("flex")]
            else:
                names = [name for name in runnable(form) if gpu or name.startswith("triton")]
            with torch.enable_grad():
                steps, failed = _first_calls(form, layout, operands, names, gradients=not self.fake_gpu)
            self.ran[key] = list(steps)
            if failed:
                self.failed[key] = failed
        usable = [name for name in runnable(form) if (gpu or not name.startswith("flex"))
                  and name not in self.failed.get(key, {})]
        if not usable:
            raise RuntimeError(f"routes: no candidate of {form!r} runs {key}: {self.failed.get(key)}")
        return usable[0]


@contextlib.contextmanager
def rehearsing(fake_gpu: bool = False):
    """Route every call as a GPU would (`routed`: on any device) and run each shape's candidates once,
    forward and gradients, instead of timing them: nothing is timed, chosen or written to the routes'
    file. On a GPU this compiles every candidate's kernels into Triton's and inductor's caches (on
    disk, shared by processes), so that a process timing the routes afterwards finds them compiled
    (the bench's prewarm, many shapes in parallel processes). Off a GPU the Triton launches go where
    the caller sends them: under `triton_target.TargetCompiler` they are compiled for a GPU and not
    run, and the values computed mean nothing (only shapes are rehearsed). With `fake_gpu` the
    operands are a GPU's fake tensors (FakeTensorMode, no GPU needed): shapes, devices and dtypes flow
    through each candidate's forward (PyTorch's autograd engine needs a real GPU for the gradients).
    Yields the `Rehearsal`."""
    global _rehearsal
    if _rehearsal is not None:
        raise RuntimeError("routes: a rehearsal is already running")
    _rehearsal = Rehearsal(fake_gpu)
    try:
        yield _rehearsal
    finally:
        _rehearsal = None


def used() -> dict[str, str]:
    """The route each shape took (key -> candidate) since `forget_used`: what a run's record names."""
    return dict(_used)


def timing_seconds() -> float:
    """Wall seconds this process has spent timing candidates, their first calls' compiles included:
    a cost paid once per shape and machine (later processes read the file)."""
    return _timing_s


def forget_used() -> None:
    """Start a run's account of routes (a sweep's worker process trains one run after another)."""
    _used.clear()


def prepare(model: torch.nn.Module, batch: tuple[int, ...], device: torch.device, channels_last: bool,
            amp: Callable[[], ContextManager]) -> None:
    """One eager forward and backward of a copy of `model` on a random batch shaped `batch`, under
    `amp` (the run's autocast), so that every shape's route is chosen before the model is compiled
    (compiled code takes the routes eager calls chose). Nothing to do off a GPU."""
    if device.type != "cuda":
        return
    with _aside(device):
        example = torch.randn(batch, device=device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        twin = copy.deepcopy(model).train()  # the model's own batch-norm statistics stay as they are
        with amp():
            out = twin(example)
        out.float().sum().backward()
        del twin, out
