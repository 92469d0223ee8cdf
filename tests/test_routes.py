"""The GPU's depth-wise routes (ablate/ops/fast/routes.py): every candidate computes the operator,
the fastest is chosen once per shape, kept in memory and in the file other processes read, and
compiled code looks the choice up while it is traced, without timing or reading files. The timing
itself is a GPU's; here it is replaced by given times (no test depends on a machine's speed)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ablate.ops.fast import routes
from ablate.ops.layouts import SlidingLayout

LAYOUT = SlidingLayout((6, 5), 3)


def _weights(form: str, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 6, 5, generator=gen, dtype=dtype)
    shape = {"static": (1, 4, 9), "per-instance": (3, 4, 9), "per-position": (3, 4, 9, 6, 5)}[form]
    return x, torch.randn(shape, generator=gen, dtype=dtype)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A process's state from scratch, its file in tmp_path, and timing allowed on the CPU."""
    monkeypatch.setenv("ABLATE_ROUTES", str(tmp_path / "routes.json"))
    monkeypatch.setattr(routes, "_chosen", {})
    monkeypatch.setattr(routes, "_used", {})
    monkeypatch.setattr(routes, "_calls", {})
    monkeypatch.setattr(routes, "_call_keys", {})
    monkeypatch.setattr(routes, "_loaded", False)
    monkeypatch.setattr(routes, "_tunable", lambda x: True)
    return tmp_path / "routes.json"


def _times(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Replace the timing by `seconds` per candidate; returns the forms timed, in order."""
    timed = []

    def fake(form, layout, operands, rounds=5):
        timed.append(form)
        return {name: seconds[name] for name in routes.runnable(form) if name in seconds}

    monkeypatch.setattr(routes, "_time_candidates", fake)
    return timed


@pytest.mark.parametrize("form", ["static", "per-instance", "per-position"])
def test_every_candidate_computes_the_reference_with_its_gradients(form):
    """Float64 on the CPU; the Triton candidates are held to the reference by the selfcheck
    (Triton's interpreter, tests/test_fast_paths.py) and on a GPU."""
    x, w = _weights(form)
    x.requires_grad_(), w.requires_grad_()
    want = LAYOUT.aggregate(x, w)
    want_grads = torch.autograd.grad(want.sum(), (x, w))
    names = [n for n in routes.CANDIDATES[form] if not n.startswith("triton")]
    assert names
    for name in names:
        got = routes.CANDIDATES[form][name](LAYOUT, x, w)
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")
        for g, wg in zip(torch.autograd.grad(got.sum(), (x, w)), want_grads):
            torch.testing.assert_close(g, wg, msg=lambda m, name=name: f"{name}: {m}")


def test_the_fastest_is_chosen_once_and_shared_through_the_file(fresh, monkeypatch):
    timed = _times(monkeypatch, {"batch-folded conv": 3e-3, "batch-folded conv channels_last": 1e-3,
                                 "triton kernel": 2e-3})
    x, w = _weights("per-instance")
    for _ in range(3):
        torch.testing.assert_close(routes.aggregate(LAYOUT, x, w), LAYOUT.aggregate(x, w))
    assert timed == ["per-instance"]  # timed at the first call only
    assert list(routes.used().values()) == ["batch-folded conv channels_last"]
    routes.forget_used()  # the next run of this process: its calls are its own account
    routes.aggregate(LAYOUT, x, w)
    assert list(routes.used().values()) == ["batch-folded conv channels_last"] and len(timed) == 1
    (key, name), = json.loads(fresh.read_text()).items()
    assert name == "batch-folded conv channels_last" and " | per-instance | " in key
    assert f"torch {torch.__version__}" in key and "(3, 8, 6, 5)" in key and "float64" in key

    # another process (fresh memory, the same file): the file's choice, no timing
    for attr, empty in (("_chosen", {}), ("_used", {}), ("_calls", {}), ("_call_keys", {}),
                        ("_loaded", False)):
        monkeypatch.setattr(routes, attr, empty)
    timed.clear()
    assert routes.choose("per-instance", LAYOUT, x, w) == "batch-folded conv channels_last" and timed == []

    # a second shape is timed and added beside the first
    x2, w2 = x[:2], w[:2]
    routes.choose("per-instance", LAYOUT, x2, w2)
    assert timed == ["per-instance"] and len(json.loads(fresh.read_text())) == 2


def test_a_default_taken_untried_that_fails_falls_back_to_the_next_candidate(fresh, monkeypatch):
    """Under inference mode nothing is timed: the first candidate is taken untried. Where it refuses
    the call, the next one runs it and is kept for that call's shapes; where all fail, the first's
    error is raised."""
    def picky(layout, x, w):
        raise RuntimeError("kernel refuses this shape")

    table = {"fast but picky": picky, "plain": routes.CANDIDATES["per-instance"]["batch-folded conv"]}
    monkeypatch.setitem(routes.CANDIDATES, "probe", table)
    x, w = _weights("per-instance")
    with torch.inference_mode():
        torch.testing.assert_close(routes.run("probe", LAYOUT, x, w), LAYOUT.aggregate(x, w))
    assert routes._calls[routes._call("probe", LAYOUT, (x, w))] == "plain"
    assert list(routes.used().values()) == ["plain"]
    monkeypatch.setitem(routes.CANDIDATES, "probe", {"fast but picky": picky, "also picky": picky})
    with torch.inference_mode(), pytest.raises(RuntimeError, match="refuses this shape"):
        routes.run("probe", LAYOUT, x[:1], w[:1])


def test_without_timing_a_form_takes_its_first_candidate(fresh, monkeypatch):
    """ABLATE_TUNE_ROUTES=0 (or the CPU): no timing; a name the file holds that this version's table
    does not know is ignored, not trusted."""
    monkeypatch.setattr(routes, "_tunable", lambda x: False)
    timed = _times(monkeypatch, {})
    x, w = _weights("per-instance")
    key = routes._key("per-instance", LAYOUT, (x, w))
    fresh.write_text(json.dumps({key: "a kernel of another version"}))
    assert routes.choose("per-instance", LAYOUT, x, w) == routes.runnable("per-instance")[0] and timed == []
    assert routes._calls  # kept: the next steps' calls look it up instead of reading the file again


def test_compiled_code_looks_the_route_up_while_traced(fresh, monkeypatch):
    """Tracing reads no file and times nothing (fullgraph: no graph break): the route of an eager
    call of this process, or the form's first candidate. A marked candidate shows which ran."""
    timed = _times(monkeypatch, {"batch-folded conv": 3e-3, "batch-folded conv channels_last": 1e-3})
    table = dict(routes.CANDIDATES["per-instance"])
    table["batch-folded conv channels_last"] = lambda layout, x, w: 2 * layout.aggregate(x, w)
    monkeypatch.setitem(routes.CANDIDATES, "per-instance", table)
    x, w = _weights("per-instance")
    want = LAYOUT.aggregate(x, w)

    def step(x, w):
        return routes.aggregate(LAYOUT, x, w)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(x, w), want)
    assert timed == []  # traced before any eager call: the first candidate, nothing timed
    torch.testing.assert_close(step(x, w), 2 * want)  # eager: timed, the (marked) fastest
    assert timed == ["per-instance"]
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(x, w), 2 * want)
    assert timed == ["per-instance"]


def test_timing_leaves_out_a_candidate_that_cannot_run_here(monkeypatch):
    """On this CPU the Triton kernels have no GPU (and no interpreter): timed without them."""
    x, w = _weights("per-instance", torch.float32)
    seconds = routes._time_candidates("per-instance", LAYOUT, (x, w), rounds=1)
    assert {"batch-folded conv", "batch-folded conv channels_last"} <= set(seconds)
    assert "triton kernel" not in seconds and all(s > 0 for s in seconds.values())


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "", '"a string"'])
def test_a_damaged_file_costs_only_the_timing(fresh, monkeypatch, content):
    fresh.write_text(content)
    timed = _times(monkeypatch, {"cudnn channels_last": 1e-3, "triton kernel": 2e-3})
    x, w = _weights("static")
    assert routes.choose("static", LAYOUT, x, w) == "cudnn channels_last" and timed == ["static"]
    assert list(json.loads(fresh.read_text()).values()) == ["cudnn channels_last"]


def test_timing_leaves_the_random_stream_as_it_found_it(fresh):
    """A run whose routes are on file and a run that times them draw the same dropout and drop-path:
    the timing's random tensors come from a stream restored after it."""
    x, w = _weights("per-instance", torch.float32)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    spent = routes.timing_seconds()
    routes.choose("per-instance", LAYOUT, x, w)  # timed for real here (the CPU candidates; Triton cannot run)
    assert json.loads(fresh.read_text())  # it did time, and kept a choice
    assert routes.timing_seconds() > spent  # and counted the time it took (the bench reports it)
    torch.testing.assert_close(torch.rand(3), want)


def test_inference_mode_defers_the_timing_to_a_call_with_gradients(fresh, monkeypatch):
    timed = _times(monkeypatch, {"cudnn channels_last": 2e-3, "triton kernel": 1e-3})
    x, w = _weights("static")
    with torch.inference_mode():
        assert routes.choose("static", LAYOUT, x, w) == "cudnn channels_last"
    assert timed == [] and not routes._calls
    assert routes.choose("static", LAYOUT, x, w) == "triton kernel" and timed == ["static"]


def _rows_of_one_projection(layout, groups=2, head=4, batch=2):
    """q, k, v (N, G, T, d) as neighbourhood attention receives them: views of one projection."""
    tokens = layout.resolution[0] * layout.resolution[1]
    rows = torch.randn(batch, tokens, 3 * groups * head, dtype=torch.float64)
    return rows.view(batch, tokens, 3, groups, head).permute(2, 0, 3, 1, 4).unbind(0)


def test_a_registered_form_is_timed_kept_and_forced_like_the_depthwise_ones(fresh, monkeypatch):
    """Neighbourhood attention's core is a form of its own (registered by its module): its key names
    each operand (the q, k, v views by their strides, the bias), the map and K; a map of as many
    tokens in another shape is another key; `forced` overrides the choice while it holds."""
    from ablate.ops.fast.wide_attention import NEIGHBOURHOOD as FORM

    timed = _times(monkeypatch, {"flex": 3e-3, "flex 64-token tiles": 1e-3, "triton logits in memory": 2e-3})
    q, k, v = _rows_of_one_projection(LAYOUT)
    bias = torch.randn(2, 9, dtype=torch.float64)
    assert routes.choose(FORM, LAYOUT, q, k, v, bias) == "flex 64-token tiles" and timed == [FORM]
    (key, name), = json.loads(fresh.read_text()).items()
    assert f" | {FORM} | " in key and "(2, 2, 30, 4) strides (720, 4, 24, 1)" in key
    assert "(2, 9) contiguous" in key and "resolution=(6, 5), kernel_size=3" in key
    routes.choose(FORM, SlidingLayout((5, 6), 3), q, k, v, bias)
    assert timed == [FORM, FORM] and len(json.loads(fresh.read_text())) == 2
    with routes.forced(FORM, "flex"):
        assert routes.choose(FORM, LAYOUT, q, k, v, bias) == "flex"
    assert routes.choose(FORM, LAYOUT, q, k, v, bias) == "flex 64-token tiles" and len(timed) == 2
    with pytest.raises(KeyError, match="no candidate 'flex 32'"), routes.forced(FORM, "flex 32"):
        pass


def test_timing_gives_every_operand_a_gradient_and_keeps_its_strides(monkeypatch):
    """The timing's random operands are strided as the call's (q, k, v views of one projection);
    an absent bias stays absent. On this CPU FlexAttention has no backward: left out."""
    from ablate.ops.fast.wide_attention import NEIGHBOURHOOD as FORM

    seen = []

    def candidate(layout, q, k, v, bias):
        seen.append(([t.stride() for t in (q, k, v)], bias))
        return q * k + v

    monkeypatch.setitem(routes.CANDIDATES, FORM, {**routes.CANDIDATES[FORM], "marked": candidate})
    q, k, v = _rows_of_one_projection(LAYOUT)
    seconds = routes._time_candidates(FORM, LAYOUT, (q, k, v, None), rounds=1)
    assert "flex" not in seconds and "flex 64-token tiles" not in seconds
    assert "marked" in seconds and seen[0] == ([q.stride()] * 3, None)
    assert ("triton logits in memory" in seconds) == ("triton logits in memory" in routes.runnable(FORM))


def test_window_matrices_are_a_form_of_their_own():
    """A windowed layout's weights (N|1, nW|1, G, T, T) are the "windowed" form, not the sliding
    per-position one of the same rank; its default is the reference (what untimed calls run), and on
    the CPU the fast backend leaves windows to the reference (the selfcheck holds the Triton
    candidate to it through Triton's interpreter)."""
    from ablate.ops import fast
    from ablate.ops.layouts import WindowLayout

    window = WindowLayout((6, 6), (3, 3), (1, 1))
    x, w = torch.randn(2, 4, 6, 6), torch.randn(1, 1, 2, 9, 9)
    assert routes.form_of(window, w) == "windowed" and routes.form_of(LAYOUT, torch.randn(3, 4, 9, 6, 5)) == (
        "per-position")
    assert routes.runnable("windowed")[0] == "einsum on windows"
    torch.testing.assert_close(routes.CANDIDATES["windowed"]["einsum on windows"](window, x, w),
                               window.aggregate(x, w))
    assert fast.aggregate(window, x, w) is None
    if importlib.util.find_spec("triton") is not None:  # the routes' limit is the kernels'
        from ablate.ops.fast.triton_window import MAX_TOKENS
        assert routes.MAX_WINDOW_TOKENS == MAX_TOKENS


def test_the_per_position_route_times_every_triton_tile():
    """Each tile of the Triton per-position kernels is a candidate of its own (the selfcheck holds
    each to the reference through Triton's interpreter)."""
    triton_dw = pytest.importorskip("ablate.ops.fast.triton_dw")
    names = [n for n in routes.CANDIDATES["per-position"] if n.startswith("triton")]
    assert names[0] == "triton" and len(names) == len(triton_dw.POSITION_TILES)
    assert {n.removeprefix("triton").strip() or triton_dw.DEFAULT_TILE for n in names} == set(
        triton_dw.POSITION_TILES)
    with pytest.raises(ValueError, match="no per-position tile '8x8'"):
        triton_dw._tile_name("position 8x8")


@pytest.mark.parametrize("bias", [True, False])
def test_the_blocks_1x1_convolutions_are_a_form_too(fresh, monkeypatch, bias):
    """The blocks' 1x1 convolutions (Swin's linear layers on a map): cuDNN's convolution or the
    linear layer on the map's rows compute the convolution's function with every gradient (float64
    here); the shape's key is the operands' alone; the fused q, k, v projection still takes them."""
    from ablate.models.blocks import POINTWISE, pointwise
    from ablate.ops.fast.attention import fusable_projection

    conv = pointwise(8, 12, bias=bias).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x, *conv.parameters()]
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for name, candidate in routes.CANDIDATES[POINTWISE].items():
        got = candidate(None, x, conv.weight, conv.bias)
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")
        for g, wg in zip(torch.autograd.grad(got.square().sum(), leaves), want_grads):
            torch.testing.assert_close(g, wg, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(conv(x), want)  # on the CPU: the convolution itself
    assert fusable_projection(conv, 8)

    timed = _times(monkeypatch, {"cudnn conv": 2e-3, "linear on rows": 1e-3})
    assert routes.choose(POINTWISE, None, x, conv.weight, conv.bias) == "linear on rows"
    assert timed == [POINTWISE]
    (key, _), = json.loads(fresh.read_text()).items()
    assert f" | {POINTWISE} | (2, 8, 5, 6) channels_last | (12, 8, 1, 1) contiguous | " in key
    assert ("(12,) contiguous" if bias else "| none |") in key and "||" not in key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("candidate", ["cudnn conv", "linear on rows"])
def test_gpu_pointwise_candidates_match_the_convolution(candidate, true_float32):
    from ablate.models.blocks import POINTWISE, pointwise

    conv = pointwise(64, 96).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x, *conv.parameters()]
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    with routes.forced(POINTWISE, candidate):
        got = conv(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, wg in zip(torch.autograd.grad(got.square().sum(), leaves), want_grads):
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=1e-5)
