"""The Triton kernels compiled for a GPU without one (ablate/ops/fast/triton_target.py,
`python -m ablate.gpu_compile`): a model's train step routed as on a GPU reaches every Triton
candidate of its shapes, each launch compiles for sm_90 with Triton's own specialisation, and what a
GPU would refuse (a compile error, more shared memory than a block may have) fails the command.

Triton decides at import whether its kernels are interpreted (TRITON_INTERPRET), so every compile
runs in a subprocess with it unset."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ablate.errors import EXIT_CODES
from ablate.ops.fast import routes
from ablate.ops.layouts import WindowLayout
from ablate.space.presets import PRESETS

pytest.importorskip("triton")


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


def test_every_kernel_of_every_preset_compiles_for_sm90_and_none_spills_in_bf16(tmp_path):
    """`make gpu-compile` as it runs: every preset at tiny in bf16 and float32, the selfcheck's cases."""
    from ablate.models import blocks  # noqa: F401  (registers the 1x1 convolutions' form)
    from ablate.ops.fast import triton_dw

    out = tmp_path / "gc"
    proc = _run("-m", "ablate.gpu_compile", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads((out / "builds.json").read_text())
    assert found["arch"] == 90 and found["problems"] == []
    # every kernel the fast paths launch (the bench's one-thread-per-output baseline is no path)
    assert {b["kernel"] for b in found["builds"]} == {"_kernel_fwd", "_kernel_wgrad", "_position_fwd",
                                                      "_position_wgrad", "_window_fwd", "_window_wgrad",
                                                      "_na_fwd", "_na_bwd_q", "_na_bwd_kv", "_na_halo_fwd",
                                                      "_na_halo_bwd"}
    for b in found["builds"]:
        assert b["error"] is None and b["shared_bytes"] <= 232448 and 0 < b["registers"] <= 255
        if b["signature"].startswith("*bf16"):  # unrolled over 49 taps, the depth-wise kernels spilled
            assert b["stack_bytes"] == 0, b
    # Swin's 7 x 7 windows, plain and shifted by 3; the per-position kernels (forward, input gradient,
    # weight gradient) on each tile
    windows = [b for b in found["builds"] if b["constants"].get("WH") == 7]
    assert {b["kernel"] for b in windows} == {"_window_fwd", "_window_wgrad"}
    assert {b["constants"]["SH"] for b in windows} == {0, 3}
    position = {(b["kernel"], b["constants"].get("ADJOINT"), b["constants"]["BLOCK_P"])
                for b in found["builds"] if b["kernel"].startswith("_position")}
    tiles = {p for p, _, _ in triton_dw.POSITION_TILES.values()}
    assert position == {(k, a, p) for k, a in (("_position_fwd", False), ("_position_fwd", True),
                                               ("_position_wgrad", None)) for p in tiles}
    # each routed shape ran every Triton candidate of its form, none failed; FlexAttention's are named
    assert len(found["routes"]) > 50
    for key, ran in found["routes"].items():
        form = key.split(" | ")[2]
        assert ran == [n for n in routes.runnable(form) if n.startswith("triton")], key
    assert "neighbourhood attention: flex" in found["not_covered"]
    assert "| _window_fwd |" in (out / "builds.md").read_text()
    # every preset's forwards on a fake GPU: the classifier in both dtypes, the dense tasks at the
    # paper's sizes in bf16; PyTorch's candidates as well as Triton's
    dense = {"UPerNet 512 x 2048", "Mask R-CNN backbone 800 x 1280"}
    fake = found["fake_gpu"]
    assert {dtype: {p: set(by[p]) for p in by} for dtype, by in fake.items()} == {
        "bfloat16": {p: {"classification", *dense} for p in PRESETS},
        "float32": {p: {"classification"} for p in PRESETS}}
    bf16 = fake["bfloat16"]
    assert {"cudnn channels_last", "triton kernel"} <= set(bf16["dwconv"]["classification"]["candidates"])
    assert "sdpa, bias as a mask" in bf16["global_attention"]["UPerNet 512 x 2048"]["candidates"]
    assert "triton fused" in bf16["neighborhood_attention"]["Mask R-CNN backbone 800 x 1280"]["candidates"]


TOYS = '''
import torch, triton, triton.language as tl

from ablate.ops.fast.triton_target import TargetCompiler


@triton.jit
def square_dot(a_ptr, b_ptr, c_ptr, B: tl.constexpr):
    i = tl.arange(0, B)
    a = tl.load(a_ptr + i[:, None] * B + i[None, :])
    b = tl.load(b_ptr + i[:, None] * B + i[None, :])
    tl.store(c_ptr + i[:, None] * B + i[None, :], tl.dot(a, b).to(c_ptr.dtype.element_ty))


def problems(arch, b, dtype):
    a = torch.zeros(b, b, dtype=dtype)
    with TargetCompiler(arch) as compiler:
        square_dot[(1,)](a, a, a, B=b)
        square_dot[(1,)](a, a, a, B=b)  # the same specialisation: compiled once
    (build,) = compiler.builds.values()
    assert build.launches == 2
    return [why for _, why in compiler.problems()]


assert problems(90, 64, torch.bfloat16) == []
# two 256 x 256 bf16 tiles: 256 KiB of shared memory, more than an H100's block may have
assert "shared memory, sm_90 allows 232448" in problems(90, 256, torch.bfloat16)[0]
# fp8 (e4m3) on the tensor cores is sm_89's and later: an A100 refuses to compile it
assert "not supported in this architecture" in problems(80, 32, torch.float8_e4m3fn)[0]
assert problems(90, 32, torch.float8_e4m3fn) == []
print("toys ok")
'''


def test_what_the_gpu_would_refuse_is_found_without_it(tmp_path):
    (tmp_path / "toys.py").write_text(TOYS)  # Triton reads a kernel's source from its file
    proc = _run("toys.py", cwd=tmp_path)
    assert proc.returncode == 0 and "toys ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--presets", "nope"], "--presets: unknown nope"),
    (["--arch", "75"], "--arch 75: no limits known"),
    (["--dtypes", "float64"], "--dtypes: float64"),
    (["--out", "/proc/no-such-folder"], "No such file or directory: /proc/no-such-folder"),
])
def test_bad_arguments_are_named(args, says):
    proc = _run("-m", "ablate.gpu_compile", *args)
    assert proc.returncode == EXIT_CODES["bad input"] and says in proc.stderr, proc.stderr


def test_a_machine_without_triton_is_told_what_the_command_needs(monkeypatch, tmp_path):
    """Without Triton (a CPU-only PyTorch, macOS) the command stopped with a ModuleNotFoundError's
    traceback, exit 1: it is bad input, exit 2, saying to install Triton."""
    from ablate import gpu_compile
    from ablate.errors import ConfigError

    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` meets where it is missing
    monkeypatch.delitem(sys.modules, "ablate.ops.fast.triton_target", raising=False)
    with pytest.raises(ConfigError, match="needs Triton.*pip install triton"):
        gpu_compile.main(["--out", str(tmp_path / "gc")])


def _quiet(_line: str) -> None:
    pass


def test_a_cpu_tensor_in_a_gpu_path_is_found_on_a_fake_gpu_and_named(monkeypatch):
    """A GPU's first run fails where a path makes a tensor on the CPU (a bias, an index) and meets
    the GPU's: the fake GPU finds it without one, in a route's candidate (the others still run the
    model) and in the model's own code."""
    from ablate import gpu_compile
    from ablate.models.backbone import AblateNet

    def careless(layout, x, w):  # a zero bias made on the default device, the CPU
        return routes.depthwise_conv_channels_last(x, w, layout.kernel_size) + torch.zeros(x.shape[1], 1, 1)

    monkeypatch.setitem(routes.CANDIDATES["static"], "careless", careless)
    ran, problems = gpu_compile.on_fake_gpu(["dwconv"], "micro", ["bfloat16"], batch=2, progress=_quiet)
    assert problems and all(p["candidate"] == "careless" and "cuda:0 and cpu" in p["why"] for p in problems)
    for subject in ran["bfloat16"]["dwconv"].values():  # the others ran the model
        assert {"cudnn channels_last", "triton kernel"} <= set(subject["candidates"])

    monkeypatch.delitem(routes.CANDIDATES["static"], "careless")
    head = AblateNet.forward_head  # (the classifier's alone: the dense tasks read the stages)
    monkeypatch.setattr(AblateNet, "forward_head", lambda self, x: head(self, x) + torch.zeros(10))
    ran, problems = gpu_compile.on_fake_gpu(["dwconv"], "micro", ["bfloat16"], batch=2, progress=_quiet)
    (problem,) = problems
    assert (problem["preset"], problem["subject"]) == ("dwconv", "classification")
    assert "cuda:0 and cpu" in problem["why"] and "classification" not in ran["bfloat16"]["dwconv"]


CARELESS = '''
import sys, torch
from ablate import gpu_compile
from ablate.ops.fast import routes

def careless(layout, x, w):
    return routes.depthwise_conv_channels_last(x, w, layout.kernel_size) + torch.zeros(x.shape[1], 1, 1)

routes.CANDIDATES["static"]["careless"] = careless
sys.exit(gpu_compile.main(sys.argv[1:]))
'''


def test_the_command_fails_on_what_the_fake_gpu_finds_and_names_it(tmp_path):
    (tmp_path / "careless.py").write_text(CARELESS)
    proc = _run(str(tmp_path / "careless.py"), "--presets", "dwconv", "--size", "micro",
                "--dtypes", "bfloat16", "--no-selfcheck", "--out", str(tmp_path / "gc"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = [line for line in proc.stderr.splitlines() if line.startswith("a GPU fails")]
    assert failures and all("| static |" in line and ": careless: " in line and "cuda:0 and cpu" in line
                            for line in failures), proc.stderr
    found = json.loads((tmp_path / "gc" / "builds.json").read_text())
    assert found["problems"] and all(p["fake_gpu"] and p["candidate"] == "careless"
                                     for p in found["problems"])


def test_the_fake_gpu_casts_with_cudas_autocast_and_leaves_it_as_it_was():
    """CUDA's autocast (not the CPU's) while the forward runs: a matmul of fake GPU tensors comes
    out in bf16; after it, autocast is off again."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ablate.gpu_compile import _cuda_autocast

    with FakeTensorMode():
        a = torch.randn(4, 4, device="cuda")
        with _cuda_autocast(torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16
        assert (a @ a).dtype == torch.float32
    assert not torch.is_autocast_enabled("cuda")


def test_a_rehearsal_routes_as_a_gpu_and_runs_each_shapes_triton_candidates_once(monkeypatch, tmp_path):
    """...and times, chooses and writes nothing: a rehearsal's processes share a GPU, whose timings
    would be each other's."""
    calls = []
    monkeypatch.setenv("ABLATE_ROUTES", str(tmp_path / "routes.json"))
    monkeypatch.setattr(routes, "_tunable", lambda x: True)  # timing allowed, were it not a rehearsal
    monkeypatch.setattr(routes, "_used", {})
    monkeypatch.setattr(routes, "_time_candidates", lambda *a, **k: pytest.fail("a rehearsal timed"))

    def counted(layout, x, w):
        calls.append(tuple(x.shape))
        return layout.aggregate(x, w)

    monkeypatch.setitem(routes.CANDIDATES["windowed"], "triton on windows", counted)
    monkeypatch.setattr(routes, "_TRITON", True)
    layout = WindowLayout((6, 6), (3, 3), (1, 1))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(1, 1, 2, 9, 9, generator=gen)
    from ablate.ops import fast

    assert fast.aggregate(layout, x, w) is None  # off a GPU: the reference, not the routes
    with routes.rehearsing() as rehearsal:
        y = fast.aggregate(layout, x, w)
        fast.aggregate(layout, x, w)  # the same shape: nothing runs again
        fast.aggregate(layout, x.double(), w.double())  # float64 keeps the reference, rehearsed or not
    torch.testing.assert_close(y, layout.aggregate(x, w))  # the call itself took the reference's route
    assert calls == [(2, 4, 6, 6)]
    (key,) = rehearsal.ran
    assert " | windowed | " in key and rehearsal.ran[key] == ["triton on windows"] and not rehearsal.failed
    assert not routes.routed(x)  # and after it, the CPU is the CPU again
    assert not (tmp_path / "routes.json").exists() and not routes.used()


def test_a_rehearsal_records_a_triton_candidate_that_fails(monkeypatch):
    def broken(layout, x, w):
        raise RuntimeError("refused")

    monkeypatch.setitem(routes.CANDIDATES["windowed"], "triton on windows", broken)
    monkeypatch.setattr(routes, "_TRITON", True)
    layout = WindowLayout((6, 6), (3, 3), (0, 0))
    x, w = torch.randn(1, 2, 6, 6), torch.randn(1, 1, 1, 9, 9)
    with routes.rehearsing() as rehearsal:
        torch.testing.assert_close(routes.aggregate(layout, x, w), layout.aggregate(x, w))
    (errors,) = rehearsal.failed.values()
    assert errors == {"triton on windows": "RuntimeError: refused"}


def test_a_kernel_the_gpu_refuses_fails_the_command_and_is_named(monkeypatch, tmp_path, capsys):
    from ablate import gpu_compile

    build = dict(kernel="_toy", constants={"B": 256}, signature="*bf16", aligned="", seconds=0.1,
                 shared_bytes=262144, registers=255, stack_bytes=0, num_warps=4, launches=1, error=None)
    why = "262144 bytes of shared memory, sm_90 allows 232448 a block"
    found = dict(arch=90, builds=[build], routes={}, not_covered=[],
                 problems=[dict(kernel="_toy", constants={"B": 256}, why=why)])
    monkeypatch.setattr(gpu_compile, "compile_for", lambda *a, **k: found)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gpu_compile.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sm_90 refuses _toy B=256: 262144 bytes of shared memory" in err
    assert "| _toy | B=256 |" in (tmp_path / "builds.md").read_text()  # what was compiled is kept
