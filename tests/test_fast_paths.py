"""Every fast path agrees with its reference, forward and gradients.

- the backend switch: process default, context manager, environment, per model, `ops.backend`;
- the CPU forms (shift-and-accumulate for homogeneous / inhomogeneous, channels_last depth-wise
  conv, SDPA window attention) through SpatialMixer against the reference backend, eagerly (fast),
  plus one small compiled check and the eager fallback when compiling fails;
- the Triton kernels on the CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET must
  be set before the kernels are compiled), and on a GPU when there is one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR, build_model
from ablate.models.blocks import SwinBlock
from ablate.ops import backend as ops_backend
from ablate.ops.fast import attention, cpu, native, predicted, routes, wide_attention
from ablate.ops.functional import sliding_aggregate, sliding_correlate
from ablate.ops.layouts import build_layout
from ablate.ops.mixer import SpatialMixer
from ablate.space.presets import PRESETS
from ablate.space.spec import Connectivity

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORMS = (cpu.position_forward, cpu.position_input_grad, cpu.position_weight_grad, cpu.kernel_forward,
         cpu.kernel_weight_grad)


@pytest.fixture
def eager_forms(monkeypatch):
    """Run the compiled forms eagerly and on every size: the same code, without compile time."""
    for form in FORMS:
        monkeypatch.setattr(form, "failed", True)
    monkeypatch.setattr(cpu, "MIN_COMPILED_ELEMENTS", 0)


# -- the switch ------------------------------------------------------------------------------------
def test_backend_default_context_and_environment(monkeypatch):
    monkeypatch.delenv("ABLATE_OPS_BACKEND", raising=False)
    assert ops_backend.default_backend() == "fast"
    with ops_backend.use_backend("reference"):
        assert ops_backend.resolve(None) == "reference"
        assert ops_backend.resolve("fast") == "fast"  # a mixer's own setting wins
    monkeypatch.setenv("ABLATE_OPS_BACKEND", "reference")
    assert ops_backend.default_backend() == "reference"
    with pytest.raises(ValueError, match="ops.backend"):
        ops_backend.set_backend("turbo")


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_config_ops_backend_pins_the_model(backend):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="measure", overrides=["operator=dwconv", "model=micro",
                                                         f"ops.backend={backend}"])
    model = build_model(cfg, 28, 1, 10)
    assert {m.backend for m in model.mixers()} == {backend}


# -- CPU forms ------------------------------------------------------------------------------------
def _inputs(n, c, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=gen), torch.randn(n, c, h, w, generator=gen)


def _compare(fast_mixer, ref_mixer, x, context, gy, tol):
    outs = []
    for m in (fast_mixer, ref_mixer):
        xi = x.clone().requires_grad_(True)
        ci = None if context is None else context.clone().requires_grad_(True)
        y = m(xi, context=ci)
        grads = torch.autograd.grad(y, [xi] + ([ci] if ci is not None else []) + list(m.parameters()), gy)
        outs.append((y, *grads))
    for got, want in zip(*outs):
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs().max() / scale).item() < tol


def _mixer_pair(spec, dim, res, cpg=None, shifted=False):
    torch.manual_seed(0)
    fast = SpatialMixer(spec, dim, res, cpg, shifted=shifted, backend="fast")
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = SpatialMixer(spec, dim, res, cpg, shifted=shifted, backend="reference")
    ref.load_state_dict(fast.state_dict())
    return fast.eval(), ref.eval()


@pytest.mark.parametrize("preset", ["dwconv", "dynamic_dwconv", "idynamic_dwconv", "locally_connected"])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_sliding_fast_paths_match_reference(preset, kernel_size, eager_forms):
    spec = PRESETS[preset].spec
    spec = replace(spec, connectivity=replace(spec.connectivity, kernel_size=kernel_size))
    cpg = {"dwconv": 1, "dynamic_dwconv": 1, "idynamic_dwconv": 3, "locally_connected": 1}[preset]
    fast, ref = _mixer_pair(spec, 6, (5, 6), cpg)
    x, gy = _inputs(2, 6, 5, 6)
    _compare(fast, ref, x, None, gy, 1e-5)


@pytest.mark.parametrize("kernel_size,bias", [(3, True), (7, True), (5, False)])
def test_idynamic_at_one_channel_per_group_never_materialises_and_matches_reference(
        kernel_size, bias, monkeypatch):
    """I-D-DW conv with G = C runs as a depth-wise conv with Ch + 1 kernels per channel and a
    contraction (predicted.py): the same output and gradients as the reference, in float32 through
    the mixer and exactly in float64 (train mode: BN's batch statistics), with context != x."""
    spec = PRESETS["idynamic_dwconv"].spec
    spec = replace(spec, connectivity=replace(spec.connectivity, kernel_size=kernel_size))
    fast, ref = _mixer_pair(spec, 8, (5, 6), 1)
    if not bias:
        for m in (fast, ref):
            m.weights.predict[-1].bias = None
    assert fast.weights.groups == fast.dim == 8
    calls = []
    real = predicted.inhomogeneous_sliding
    monkeypatch.setattr(predicted, "inhomogeneous_sliding", lambda *a: calls.append(1) or real(*a))
    x, context = _inputs(2, 8, 5, 6)
    gy = torch.randn(2, 8, 5, 6)
    _compare(fast, ref, x, context, gy, 1e-5)
    _compare(fast, ref, x.contiguous(memory_format=torch.channels_last), None, gy, 1e-5)
    assert len(calls) == 2
    ref.double().train()
    xd, cd = x.double().requires_grad_(True), context.double().requires_grad_(True)
    got = real(ref.weights, xd, cd, ref.layout)
    want = ref(xd, context=cd)
    params = [xd, cd] + list(ref.parameters())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(y, params, gy.double()) for y in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_position_form_in_bf16_accumulates_in_fp32(dtype, eager_forms):
    x = torch.randn(2, 2, 3, 6, 6)
    w = torch.randn(2, 2, 9, 6, 6)
    ref = sliding_aggregate(x.to(dtype).double(), w.to(dtype).double(), 3)
    got = cpu.position_aggregate(x.to(dtype), w.to(dtype), 3)
    assert got.dtype == dtype
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("preset,res,shifted", [
    ("local_attention", (14, 14), False),
    ("local_attention", (14, 14), True),
    ("local_attention", (9, 11), True),   # padded to a multiple of the window
    ("global_attention", (5, 6), False),
])
def test_window_attention_sdpa_matches_reference(preset, res, shifted):
    spec = PRESETS[preset].spec
    spec = replace(spec, connectivity=replace(spec.connectivity, kernel_size=7))
    fast, ref = _mixer_pair(spec, 8, res, 4, shifted=shifted)
    x, context = _inputs(2, 8, *res)
    gy = torch.randn(2, 8, *res)
    _compare(fast, ref, x, context, gy, 1e-5)
    _compare(fast, ref, x.contiguous(memory_format=torch.channels_last), context, gy, 1e-5)
    with torch.no_grad():  # inference: the mask needs no gradient, so SDPA's fused kernel runs
        torch.testing.assert_close(fast(x, context), ref(x, context), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("windows,masks,chunk", [
    (4, 4, 200),   # a mask per window (shifted), each image's logits split into blocks of query rows
    (4, 1, 200),   # one mask (the position bias) broadcast over the windows
    (4, 1, 1500),  # whole images per chunk, two at a time
    (1, 1, 10 ** 6),
])
def test_learned_mask_attention_in_chunks_is_autograds_composition(monkeypatch, windows, masks, chunk):
    """The CPU training path of attention with a learned mask computes softmax(q k^T + mask) v and its
    four gradients (the mask's summed over images) exactly as autograd does, whatever the chunking;
    float64 gradcheck on the chunked form itself."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    n, g, t, d = 3, 2, 9, 5
    q, k, v = (torch.randn(n * windows, g, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(masks, g, t, t, dtype=torch.float64, requires_grad=True)
    logits = torch.matmul(q, k.transpose(-2, -1)).view(n, windows, g, t, t) + mask
    want = torch.matmul(logits.softmax(-1).flatten(0, 1), v)
    got = attention.attend(q, k, v, mask, n)
    gy = torch.randn_like(want)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(y, (q, k, v, mask), gy) for y in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda *a: attention.attend(*a, n), (q, k, v, mask))


@pytest.mark.parametrize("masks", [2, 1])
def test_learned_mask_attention_double_backward_is_autograds(monkeypatch, masks):
    """The chunked backward saves the softmax as a constant: differentiated again (create_graph) it
    dropped the softmax's dependence on q, k and the mask, a silently wrong second derivative (a
    gradient penalty, say). Under create_graph it must be autograd's composition."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 20)
    n, windows, g, t, d = 2, 2, 1, 4, 3
    q, k, v = (torch.randn(n * windows, g, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(masks, g, t, t, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: attention.attend(*a, n), (q, k, v, mask))


@pytest.mark.parametrize("res,shifted", [((14, 14), False), ((14, 14), True), ((9, 11), True),
                                         ((5, 6), False)])
def test_window_rows_are_the_partition_and_merge_is_its_inverse(res, shifted):
    """The fast path's pad + roll + reshape of NHWC rows is the layout's `partition`, `merge_rows` its
    inverse, and the head split a view of the windows (q, k, v in one tensor)."""
    layout = build_layout(Connectivity("window", 7, shift=shifted), res)
    t = torch.randn(2, 6, *res, dtype=torch.float64)
    windows = attention.partition_rows(t.permute(0, 2, 3, 1), layout)  # (N * nW, T, C)
    want = layout.partition(t)  # (N, nW, C, T)
    assert torch.equal(windows, want.flatten(0, 1).transpose(1, 2))
    assert torch.equal(attention.merge_rows(windows, layout, 2).permute(0, 3, 1, 2), t)
    q, k, v = attention.heads(torch.cat([windows, 2 * windows, 3 * windows], -1), 3, 2)
    (rows,) = attention.heads(windows, 1, 2)  # (N * nW, G, T, Cg)
    assert torch.equal(q, rows) and torch.equal(k, 2 * rows) and torch.equal(v, 3 * rows)
    assert torch.equal(rows, want.flatten(0, 1).reshape(-1, 2, 3, layout.tokens).transpose(2, 3))


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention's eager form is a dense composition of its hooks on any device, but refuses a
    backward on the CPU; lifting that refusal lets the tests check the hooks' gradients here."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def _attention_matches_reference(preset, res, kernel_size, bias, value_proj, fast):
    """`fast(source, x, context, layout, value_proj)` equals the reference operator, forward and every
    gradient (the bias table's included), in float64."""
    spec = PRESETS[preset].spec
    spec = replace(spec, connectivity=replace(spec.connectivity, kernel_size=kernel_size),
                   dynamic=replace(spec.dynamic, position_bias=bias))
    torch.manual_seed(0)
    mixer = SpatialMixer(spec, 8, res, 4, backend="reference").double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_()
    proj = torch.nn.Conv2d(8, 8, 1).double() if value_proj else None
    x = torch.randn(2, 8, *res, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 8, *res, dtype=torch.float64)
    params = [x, *mixer.parameters(), *(proj.parameters() if proj else [])]
    outs = []
    for y in (fast(mixer.weights, x, x, mixer.layout, proj), mixer(x, value_proj=proj)):
        outs.append((y, *torch.autograd.grad(y, params, gy)))
    assert len(outs[0]) == 1 + len(params)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
# the fused Triton kernels run on a GPU, or through Triton's interpreter: the selfcheck holds them
@pytest.mark.parametrize("candidate", [c for c in routes.CANDIDATES[wide_attention.NEIGHBOURHOOD]
                                       if not c.startswith("triton fused")])
@pytest.mark.parametrize("res,kernel_size,bias", [
    ((9, 11), 5, True),
    ((6, 5), 7, True),   # the neighbourhood wider than the map
    ((8, 8), 3, False),
    ((10, 13), 7, True),  # 130 tokens: two 128-token and three 64-token tiles, the last partly filled
])
@pytest.mark.parametrize("value_proj", [True, False])
def test_neighbourhood_candidates_match_reference(candidate, res, kernel_size, bias, value_proj,
                                                  flex_backward_on_cpu):
    """Each of the GPU's neighbourhood-attention candidates (FlexAttention with 128-token tiles, with
    64-token tiles and the bias in 64 row copies; the logits in memory) equals the reference operator,
    forward and every gradient, in float64: FlexAttention through its eager form, the logits in
    memory with the reference's correlate (its Triton correlate, and the fused kernels: the
    selfcheck)."""
    def fast(*args):
        with routes.forced(wide_attention.NEIGHBOURHOOD, candidate):
            return wide_attention.neighbourhood_attention(*args)
    _attention_matches_reference("neighborhood_attention", res, kernel_size, bias, value_proj, fast)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("candidate", list(routes.CANDIDATES[wide_attention.GLOBAL]))
@pytest.mark.parametrize("res,bias", [((5, 6), True), ((4, 4), False), ((12, 11), True)])
@pytest.mark.parametrize("value_proj", [True, False])
def test_global_candidates_match_reference(candidate, res, bias, value_proj, flex_backward_on_cpu):
    """Global attention's GPU candidates (FlexAttention with the bias as a score_mod; SDPA with the
    bias expanded to a mask) equal the reference, forward and every gradient, in float64."""
    def fast(*args):
        with routes.forced(wide_attention.GLOBAL, candidate):
            return wide_attention.global_attention(*args)
    _attention_matches_reference("global_attention", res, 7, bias, value_proj, fast)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_every_flex_shape_gets_its_compiled_kernel(monkeypatch):
    """Dynamo runs a code object eagerly after `recompile_limit` compiled shapes: one shared
    `torch.compile(flex_attention)` fell back to the dense eager form at a process's ninth shape. Each
    shape and variant compiles on its own (traced with the eager backend here: no kernel generation;
    forward only, as FlexAttention has no CPU backward), and a compiled model's trace looks up the
    block mask an eager call built."""
    from ablate.ops.fast import flex

    graphs = []

    def backend(gm, example_inputs):  # dynamo's eager backend, counting what it is handed
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(flex, "BACKEND", backend)
    monkeypatch.setattr(flex, "_compiled", {})
    torch._dynamo.reset()
    with torch.no_grad():
        for res, block in (((4, 4), 128), ((4, 5), 128), ((5, 5), 128), ((5, 5), 64), ((3, 7), 64)):
            q, k, v = torch.randn(3, 1, 2, res[0] * res[1], 8).unbind(0)
            bias = torch.randn(2, 9)
            seen = len(graphs)
            got = flex.neighbourhood(q, k, v, bias, res, 3, block, compiled=True)
            assert len(graphs) > seen, f"{res} {block}: run eagerly, not compiled"
            want = flex.neighbourhood(q, k, v, bias, res, 3, block, compiled=False)
            torch.testing.assert_close(got, want)
    assert len(flex._compiled) == 5

    def model(q, k, v, bias):
        return flex.neighbourhood(q, k, v, bias, (3, 7), 3, 64, compiled=True) * 2

    masks = len(flex._block_masks)
    traced = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(traced(q, k, v, bias), 2 * want)
    assert len(flex._block_masks) == masks


def test_finer_flex_tiles_visit_fewer_keys():
    """What the 64-token tiles save, counted from the block masks the kernel skips by (tiny's maps)."""
    from ablate.ops.fast import flex

    for res, at_128, at_64 in (((56, 56), 12.7, 8.8), ((14, 14), 6.8, 4.3), ((7, 7), 6.8, 1.7)):
        assert flex.visited_keys(res, 7, 128) == pytest.approx(at_128, abs=0.05)
        assert flex.visited_keys(res, 7, 64) == pytest.approx(at_64, abs=0.05)


def _block_pair(preset, res, shifted, dim=8, cpg=4):
    torch.manual_seed(0)
    spec = PRESETS[preset].spec
    spec = replace(spec, connectivity=replace(spec.connectivity, kernel_size=7))
    blocks = []
    for backend in ("fast", "reference"):
        torch.manual_seed(0)
        mixer = SpatialMixer(spec, dim, res, cpg, shifted=shifted, backend=backend)
        blocks.append(SwinBlock(mixer))
    with torch.no_grad():
        for p in blocks[0].parameters():
            p.add_(0.1 * torch.randn_like(p))
    blocks[1].load_state_dict(blocks[0].state_dict())
    return blocks


@pytest.mark.parametrize("preset,res,shifted", [
    ("local_attention", (14, 14), True),
    ("local_attention", (9, 11), True),
    ("global_attention", (5, 6), False),
])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_swin_block_fused_qkv_matches_reference(preset, res, shifted, layout):
    """The Swin block hands its value projection to the operator: the fast path makes v, q and k in
    one GEMM. Forward and every gradient (training: the bias needs its gradient), and inference
    (SDPA's fused kernel), against the reference block."""
    fast, ref = _block_pair(preset, res, shifted)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, *res).contiguous(memory_format=fmt)
    gy = torch.randn(2, 8, *res)
    outs = []
    for block in (fast, ref):
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        outs.append((y, *torch.autograd.grad(y, [xi, *block.parameters()], gy)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_value_projection_that_cannot_fuse_is_applied_first():
    spec = PRESETS["local_attention"].spec
    fast, ref = _mixer_pair(spec, 8, (14, 14), 4, shifted=True)
    proj = torch.nn.Conv2d(8, 8, 3, padding=1)  # not a 1x1 projection: values computed on their own
    x = torch.randn(2, 8, 14, 14)
    torch.testing.assert_close(fast(x, value_proj=proj), ref(proj(x), context=x), rtol=1e-5, atol=1e-5)
    other = torch.randn(2, 8, 14, 14)  # a context other than x: the values cannot share its GEMM
    pw = torch.nn.Conv2d(8, 8, 1)
    torch.testing.assert_close(fast(x, other, value_proj=pw), ref(pw(x), context=other), rtol=1e-5, atol=1e-5)


# -- the native kernels (sliding.c) ---------------------------------------------------------------
requires_native = pytest.mark.skipif(not native.available(),
                                     reason="no C compiler to build the native kernels")
# (N, G, Cg, H, W, K, weight batch): odd and tiny maps, kernels larger than the map, shared weights
NATIVE_SHAPES = [(3, 2, 3, 5, 6, 3, 3), (2, 4, 1, 14, 14, 7, 1), (2, 1, 2, 2, 3, 7, 2), (2, 2, 3, 4, 4, 7, 2),
                 (1, 2, 2, 4, 4, 5, 1)]


def _native_operands(n, g, c, h, w, k, wn, dtype, position_major=False):
    gen = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, g, c, h, w, generator=gen, dtype=dtype)
    if position_major:  # the channels_last output of the convolution that predicts the weights
        weights = torch.randn(wn, h, w, g, k * k, generator=gen, dtype=dtype).permute(0, 3, 4, 1, 2)
    else:
        weights = torch.randn(wn, g, k * k, h, w, generator=gen, dtype=dtype)
    return x.requires_grad_(True), weights.requires_grad_(True)


@requires_native
@pytest.mark.parametrize("shape", NATIVE_SHAPES)
@pytest.mark.parametrize("position_major", [False, True])
def test_native_kernels_match_the_reference(shape, position_major):
    n, g, c, h, w, k, wn = shape
    x, weights = _native_operands(*shape, torch.float32, position_major)
    y, ry = native.aggregate(x, weights, k), sliding_aggregate(x, weights, k)
    gy = torch.randn_like(ry)
    for got, want in zip((y, *torch.autograd.grad(y, (x, weights), gy)),
                         (ry, *torch.autograd.grad(ry, (x, weights), gy))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a, b = x.detach().requires_grad_(True), torch.randn_like(x).requires_grad_(True)
    logits, ref = native.correlate(a, b, k), sliding_correlate(a, b, k)
    gl = torch.randn_like(ref)
    for got, want in zip((logits, *torch.autograd.grad(logits, (a, b), gl)),
                         (ref, *torch.autograd.grad(ref, (a, b), gl))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_native
@pytest.mark.parametrize("shape", NATIVE_SHAPES[:3])
def test_native_kernels_gradcheck_in_float64(shape):
    k = shape[5]
    x, weights = _native_operands(*shape, torch.float64, position_major=shape[-1] > 1)
    assert torch.autograd.gradcheck(lambda a, b: native.aggregate(a, b, k), (x, weights))
    b = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: native.correlate(a, c, k), (x, b))


@requires_native
@pytest.mark.parametrize("shape", [NATIVE_SHAPES[0], NATIVE_SHAPES[4]])
def test_native_kernels_double_backward_in_float64(shape):
    """The gradients are operators too (a gradient penalty differentiates them again, as the
    reference's are): gradgradcheck of aggregate (per-image and shared weights) and correlate."""
    k = shape[5]
    x, weights = _native_operands(*shape, torch.float64, position_major=True)
    assert torch.autograd.gradgradcheck(lambda a, b: native.aggregate(a, b, k), (x, weights))
    b = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, c: native.correlate(a, c, k), (x, b))


@requires_native
def test_native_kernels_refuse_operands_of_another_map():
    """They read by pointer: weights of a 6 x 6 map at a 12 x 12 map's positions were read past their
    end (a result, no error)."""
    with pytest.raises(ValueError, match=r"weights \(1, 1, 9, 6, 6\) do not fit x \(1, 1, 1, 12, 12\)"):
        native.aggregate(torch.randn(1, 1, 1, 12, 12), torch.randn(1, 1, 9, 6, 6), 3)
    with pytest.raises(ValueError, match="differ"):
        native.correlate(torch.randn(1, 1, 1, 12, 12), torch.randn(1, 1, 1, 6, 6), 3)


@requires_native
@pytest.mark.parametrize("preset", ["idynamic_dwconv", "locally_connected", "neighborhood_attention"])
def test_native_mixers_match_reference(preset, monkeypatch):
    """Through SpatialMixer at a micro-like size, where the native kernels are the fast path."""
    calls = []
    for name in ("aggregate", "correlate"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    cpg = {"idynamic_dwconv": 3, "locally_connected": 1, "neighborhood_attention": 3}[preset]
    fast, ref = _mixer_pair(PRESETS[preset].spec, 6, (7, 7), cpg)
    x, gy = _inputs(3, 6, 7, 7)
    _compare(fast, ref, x, None, gy, 1e-5)
    assert "aggregate" in calls and (preset != "neighborhood_attention" or "correlate" in calls)


def test_without_native_kernels_the_reference_runs(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv("ABLATE_KERNEL_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    with caplog.at_level("WARNING"):
        assert not native.available() and not native.available()
    assert sum("native sliding kernels unavailable" in r.message for r in caplog.records) == 1
    fast, ref = _mixer_pair(PRESETS["locally_connected"].spec, 6, (5, 5), 1)
    x, gy = _inputs(2, 6, 5, 5)
    _compare(fast, ref, x, None, gy, 1e-6)


def test_effective_weights_unchanged_by_backend(eager_forms):
    spec = PRESETS["idynamic_dwconv"].spec
    fast, ref = _mixer_pair(spec, 6, (5, 5), 3)
    x, _ = _inputs(1, 6, 5, 5)
    assert torch.equal(fast.effective_weights(x, [(2, 2)]), ref.effective_weights(x, [(2, 2)]))


def test_compiled_forms_match_reference(monkeypatch):
    """One small compiled check of each form (K=3 keeps the compile short; cached on disk)."""
    monkeypatch.setattr(cpu, "MIN_COMPILED_ELEMENTS", 0)
    x = torch.randn(2, 2, 3, 6, 7, requires_grad=True)
    w = torch.randn(2, 2, 9, 6, 7, requires_grad=True)
    y = cpu.position_aggregate(x, w, 3)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    ry = sliding_aggregate(x, w, 3)
    rgx, rgw = torch.autograd.grad(ry, (x, w), torch.ones_like(ry))
    for got, want in ((y, ry), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(f.failed for f in FORMS[:3]), "compilation fell back to eager"

    xk = torch.randn(2, 4, 6, 7, requires_grad=True)
    wk = torch.randn(2, 4, 9, requires_grad=True)
    y = cpu.kernel_aggregate(xk, wk, 3)
    ry = sliding_aggregate(xk[:, :, None], wk[..., None, None].expand(2, 4, 9, 6, 7), 3)[:, :, 0]
    for got, want in zip(torch.autograd.grad(y, (xk, wk), torch.ones_like(y)),
                         torch.autograd.grad(ry, (xk, wk), torch.ones_like(ry))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_forms_double_backward(eager_forms):
    """The forms' backward read a padded copy of x made inside forward, cut off from x's graph: the
    weight gradient's own gradient in x was silently zero (create_graph, a gradient penalty)."""
    x = torch.randn(2, 2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 9, 4, 5, dtype=torch.float64, requires_grad=True)  # shared over the batch
    assert torch.autograd.gradgradcheck(lambda a, b: cpu.position_aggregate(a, b, 3), (x, w))
    xk = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(2, 2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: cpu.kernel_aggregate(a, b, 3), (xk, wk))


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    form = cpu.CompiledForm(lambda a: a * 2)
    with caplog.at_level("WARNING"):
        assert torch.equal(form(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(form(torch.ones(3)), torch.full((3,), 2.0))
    assert form.failed
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1


def test_small_inputs_stay_on_reference():
    assert not cpu.compile_pays(torch.zeros(2, 4, 6, 6))
    assert not cpu.compile_pays(torch.zeros(64, 64, 32, 32, dtype=torch.float64))
    assert not cpu.compile_pays(torch.zeros(128, 32, 14, 14))  # a micro batch: compiling would not pay
    assert cpu.compile_pays(torch.zeros(32, 96, 56, 56))  # tiny's stage 1


def test_sliding_layout_kinds_cover_the_presets():
    # the fast dispatch keys on the layout kind and weight rank; the sliding presets must reach it
    for name in ("dwconv", "dynamic_dwconv", "idynamic_dwconv", "locally_connected"):
        assert PRESETS[name].spec.connectivity.kind == Connectivity().kind == "sliding"


# -- Triton ----------------------------------------------------------------------------------------
def _selfcheck(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ablate.ops.fast.selfcheck", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_triton_kernels_through_the_interpreter():
    pytest.importorskip("triton")
    proc = _selfcheck("--device", "cpu", env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from ablate.ops.fast import selfcheck

    # every kernel case, on other tiles too, the correlate's, the windows' and fused neighbourhood
    # attention's cases, five compiled operator families
    cases = (selfcheck.CASES, selfcheck.TILE_CASES, selfcheck.CORRELATE_CASES, selfcheck.WINDOW_CASES,
             selfcheck.NEIGHBOURHOOD_CASES)
    # (the neighbourhood cases twice: the offset-walking and the halo kernels)
    assert proc.stdout.count(" ok") == sum(map(len, cases)) + len(selfcheck.NEIGHBOURHOOD_CASES) + 5


@pytest.mark.parametrize("device,env,message", [
    ("tpu", {}, "--device tpu: the selfcheck runs on cuda, cuda:<index> or cpu"),
    ("cpu", {"TRITON_INTERPRET": "0"}, "--device cpu runs the kernels through Triton's interpreter: "
                                        "TRITON_INTERPRET=1"),
    *([] if torch.cuda.is_available() else [("cuda", {}, "--device cuda, but PyTorch sees no CUDA GPU")]),
    ("cuda:99", {}, "--device cuda:99, but")])
def test_the_selfcheck_on_a_device_it_cannot_use_says_what_to_run(device, env, message, monkeypatch,
                                                                    capsys):
    """A line and exit 2 before any kernel (was a traceback from Triton's driver or torch.cuda, exit 1,
    which gpu_check's report would count as a failing case)."""
    from ablate.ops.fast import selfcheck

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        selfcheck.main(["--device", device])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_batch_shared_weight_gradient_splits_the_batch_only_to_fill_the_gpu():
    """Instances per program of the locally connected layer's weight gradient: the whole batch where
    the tiles of positions alone give the programs wanted (one exact store per weight), else chunks
    (atomic adds) until about that many programs, and never an empty chunk."""
    pytest.importorskip("triton")
    from ablate.ops.fast.triton_dw import _shared_chunks

    assert _shared_chunks(128, programs=600, wanted=528) == 128  # the tiles alone fill 132 SMs
    assert _shared_chunks(128, programs=147, wanted=528) == 32  # tiny stage 1: 4 chunks of 32
    assert _shared_chunks(128, programs=24, wanted=528) == 6  # stage 4: 22 chunks, the last of 2
    assert _shared_chunks(2, programs=1, wanted=528) == 1
    for n in range(1, 40):
        for programs in (1, 3, 50):
            per = _shared_chunks(n, programs, 12)
            assert 1 <= per <= n and (-(-n // per) - 1) * per < n  # the last chunk is not empty


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernels_on_gpu(dtype):
    proc = _selfcheck("--device", "cuda", "--dtype", dtype)
    assert proc.returncode == 0, proc.stdout + proc.stderr


GPU_PRESETS = ["dwconv", "dynamic_dwconv", "idynamic_dwconv", "locally_connected", "local_attention",
               "local_mlp", "neighborhood_attention", "global_attention"]
STATIC = ("dwconv", "locally_connected", "local_mlp")  # no context to differentiate


def _gpu_pair(preset):
    spec = PRESETS[preset].spec
    cpg = {"dwconv": 1, "dynamic_dwconv": 1, "idynamic_dwconv": 4, "locally_connected": 1}.get(preset, 32)
    fast, ref = _mixer_pair(spec, 64, (14, 14), cpg, shifted=preset in ("local_attention", "local_mlp"))
    return fast.cuda(), ref.cuda()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_fast_mixer_matches_reference(preset, true_float32):
    fast, ref = _gpu_pair(preset)
    x, context = (t.cuda() for t in _inputs(4, 64, 14, 14))
    gy = torch.randn(4, 64, 14, 14, device="cuda")
    context = None if preset in STATIC else context
    _compare(fast, ref, x.contiguous(memory_format=torch.channels_last), context, gy, 1e-4)


# bf16 storage with fp32 accumulation: the largest error relative to the largest value, against the
# float32 reference (bf16 has an 8-bit mantissa: 3.9e-3 per rounding, a few roundings per path)
BF16_TOLERANCE = 3e-2


def _assert_bf16_within_tolerance(fast, ref, static: bool):
    """The fast mixer as training runs it on a GPU (bf16 autocast, channels_last) against the
    reference in float32: forward and every gradient within BF16_TOLERANCE."""
    x, context = (t.cuda().contiguous(memory_format=torch.channels_last) for t in _inputs(4, 64, 14, 14))
    gy = torch.randn(4, 64, 14, 14, device="cuda")
    outs = []
    for mixer, autocast in ((fast, True), (ref, False)):
        xi = x.clone().requires_grad_(True)
        ci = None if static else context.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = mixer(xi, context=ci)
        leaves = [xi, *([ci] if ci is not None else []), *mixer.parameters()]
        outs.append((y.float(), *torch.autograd.grad(y.float(), leaves, gy)))
    for got, want in zip(*outs):
        error = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        assert error < BF16_TOLERANCE, error


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_fast_mixer_in_bf16_within_its_tolerance(preset, true_float32):
    _assert_bf16_within_tolerance(*_gpu_pair(preset), static=preset in STATIC)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("preset,form,candidate", [
    (preset, form, name) for preset, form in (("neighborhood_attention", wide_attention.NEIGHBOURHOOD),
                                              ("global_attention", wide_attention.GLOBAL))
    for name in routes.CANDIDATES[form]])
def test_gpu_wide_attention_candidates_match_reference(preset, form, candidate, true_float32):
    """Each candidate of neighbourhood and global attention, not only the one the timing chose:
    float32 (TF32 off) to 1e-4, and bf16 autocast within its tolerance."""
    fast, ref = _gpu_pair(preset)
    x, context = (t.cuda() for t in _inputs(4, 64, 14, 14))
    gy = torch.randn(4, 64, 14, 14, device="cuda")
    with routes.forced(form, candidate):
        _compare(fast, ref, x.contiguous(memory_format=torch.channels_last), context, gy, 1e-4)
        _assert_bf16_within_tolerance(fast, ref, static=False)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("candidate", list(routes.CANDIDATES["windowed"]))
def test_gpu_window_candidates_match_reference(candidate, true_float32):
    """Each candidate of window matrices (the local MLP's shifted windows here): float32 (TF32 off)
    to 1e-4, and bf16 autocast within its tolerance."""
    fast, ref = _gpu_pair("local_mlp")
    x, _ = (t.cuda() for t in _inputs(4, 64, 14, 14))
    gy = torch.randn(4, 64, 14, 14, device="cuda")
    with routes.forced("windowed", candidate):
        _compare(fast, ref, x.contiguous(memory_format=torch.channels_last), None, gy, 1e-4)
        _assert_bf16_within_tolerance(fast, ref, static=True)
