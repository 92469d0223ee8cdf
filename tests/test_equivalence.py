"""Numerical equivalences with reference implementations, given the same weights.

- `local_attention` in a `SwinBlock` equals timm's `SwinTransformerBlock` (Swin's window attention),
  unshifted and shifted, at a map size where the shift mask matters; also the attention alone and
  the attention probabilities themselves. `global_attention` equals a Swin block whose window is
  the whole map.
- `dwconv` equals `locally_connected` with its weights tied over positions, and equals
  `F.conv2d` depth-wise (also grouped, channels_per_group > 1).
- `dynamic_dwconv` equals a per-instance depth-wise convolution with the kernel it predicted.
- window connectivity: a static offset table equals the position-specific `local_mlp` weight filled
  with that table (the windowed analogue of dwconv == tied locally connected).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

from ablate.models.blocks import SwinBlock
from ablate.ops.mixer import SpatialMixer
from ablate.space.presets import PRESETS
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing

DIM, RES, HEADS = 64, (14, 14), 2  # 2 heads of 32 channels; 14 = 2 windows of 7: the shift mask matters


# ------------------------------------------------------------------------------------------------
# local attention == timm's Swin
# ------------------------------------------------------------------------------------------------

def _copy_swin_weights(ref: SwinTransformerBlock, ours: SwinBlock) -> None:
    """timm's (Linear, NHWC) Swin block weights into our (1x1 conv, NCHW) SwinBlock."""
    c = ours.mixer.dim
    conv = lambda w: w[:, :, None, None]  # noqa: E731  Linear (out, in) -> 1x1 conv (out, in, 1, 1)
    with torch.no_grad():
        ours.norm1.weight.copy_(ref.norm1.weight)
        ours.norm1.bias.copy_(ref.norm1.bias)
        qkv_w, qkv_b = ref.attn.qkv.weight, ref.attn.qkv.bias
        ours.mixer.weights.qk.weight.copy_(conv(qkv_w[: 2 * c]))  # rows [0:C] q, [C:2C] k
        ours.mixer.weights.qk.bias.copy_(qkv_b[: 2 * c])
        ours.in_proj.weight.copy_(conv(qkv_w[2 * c:]))  # rows [2C:3C] v
        ours.in_proj.bias.copy_(qkv_b[2 * c:])
        ours.out_proj.weight.copy_(conv(ref.attn.proj.weight))
        ours.out_proj.bias.copy_(ref.attn.proj.bias)
        ours.mixer.weights.position_bias.copy_(ref.attn.relative_position_bias_table.t())
        ours.norm2.weight.copy_(ref.norm2.weight)
        ours.norm2.bias.copy_(ref.norm2.bias)
        ours.mlp[0].weight.copy_(conv(ref.mlp.fc1.weight))
        ours.mlp[0].bias.copy_(ref.mlp.fc1.bias)
        ours.mlp[2].weight.copy_(conv(ref.mlp.fc2.weight))
        ours.mlp[2].bias.copy_(ref.mlp.fc2.bias)
    # no settings are copied: LayerNorm's eps must already be Swin's (nn.LayerNorm's 1e-5)


def _randomize(module: torch.nn.Module) -> None:
    """Weights far from init (norm affine, biases, position table), so that nothing hides."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.5))


def _pair(preset: str, window: int, shift: int, fused: bool):
    ref = SwinTransformerBlock(DIM, RES, num_heads=HEADS, window_size=window, shift_size=shift,
                               mlp_ratio=4.0, drop_path=0.0)
    ref.attn.fused_attn = fused
    _randomize(ref)
    mixer = SpatialMixer(PRESETS[preset].spec, DIM, RES, channels_per_group=DIM // HEADS,
                         shifted=shift > 0)
    ours = SwinBlock(mixer, mlp_ratio=4.0, drop_path=0.0)
    _copy_swin_weights(ref, ours)
    return ref.eval(), ours.eval()


SWIN_CASES = [
    pytest.param("local_attention", 7, 0, id="local_attention-unshifted"),
    pytest.param("local_attention", 7, 3, id="local_attention-shifted"),
    pytest.param("global_attention", 14, 0, id="global_attention-window=map"),
]


@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize("preset,window,shift", SWIN_CASES)
def test_attention_block_equals_timm_swin(preset, window, shift, fused):
    torch.manual_seed(0)
    ref, ours = _pair(preset, window, shift, fused)
    assert ref.shift_size == (shift, shift)  # timm really shifts (the map is larger than a window)
    assert ours.mixer.layout.shift == (shift, shift)
    x = torch.randn(2, *RES, DIM)  # NHWC, as timm's block takes it
    with torch.no_grad():
        expected = ref(x)
        got = ours(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # the attention branch alone: timm's _attn(norm1(x)) against out_proj(op(in_proj(u), u))
        expected_attn = ref._attn(ref.norm1(x))
        u = ours.norm1(x.permute(0, 3, 1, 2))
        got_attn = ours.out_proj(ours.mixer(ours.in_proj(u), context=u)).permute(0, 2, 3, 1)
    assert (got_attn - expected_attn).abs().max().item() < 1e-5
    assert (got - expected).abs().max().item() < 1e-5
    # the comparison is not vacuous: the attention branch is of order one
    assert expected_attn.abs().mean() > 0.1


@pytest.mark.parametrize("shift", [0, 3], ids=["unshifted", "shifted"])
def test_local_attention_probabilities_equal_timm(shift):
    """Our weights w[n, window, head, i, j] are timm's softmax output, window by window."""
    torch.manual_seed(1)
    ref, ours = _pair("local_attention", 7, shift, fused=False)
    captured = []
    handle = ref.attn.softmax.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randn(2, *RES, DIM)
    with torch.no_grad():
        ref(x)
        u = ours.norm1(x.permute(0, 3, 1, 2))
        w = ours.mixer.weights(u, ours.mixer.layout)  # (N, nW, G, T, T)
    handle.remove()
    (attn,) = captured  # (N * nW, heads, T, T), batch-major as timm's window_partition
    assert w.shape == (2, 4, HEADS, 49, 49)
    torch.testing.assert_close(w.reshape(attn.shape), attn, rtol=0, atol=1e-6)
    if shift:  # the mask really removed pairs (timm: -100 logit; ours: -inf, exactly 0)
        assert (w == 0).any() and (attn < 1e-30).any()


# ------------------------------------------------------------------------------------------------
# dwconv == locally connected with tied weights == F.conv2d
# ------------------------------------------------------------------------------------------------

def _sliding_mixer(preset: str, dim: int, res, cpg: int) -> SpatialMixer:
    spec = PRESETS[preset].spec.with_axes(channels_per_group=cpg, groups=None)
    return SpatialMixer(spec, dim, res, channels_per_group=cpg).double().eval()


@pytest.mark.parametrize("cpg", [1, 2])
def test_dwconv_equals_tied_locally_connected(cpg):
    torch.manual_seed(2)
    dim, res, k = 4, (9, 10), 7
    dw = _sliding_mixer("dwconv", dim, res, cpg)
    lc = _sliding_mixer("locally_connected", dim, res, cpg)
    assert lc.weights.weight.shape == (dim // cpg, k * k, *res)
    with torch.no_grad():
        dw.bias.normal_()
        lc.bias.copy_(dw.bias)
        lc.weights.weight.copy_(dw.weights.weight[:, :, None, None].expand_as(lc.weights.weight))
    x = torch.randn(2, dim, *res, dtype=torch.float64)
    with torch.no_grad():
        y_dw, y_lc = dw(x), lc(x)
    torch.testing.assert_close(y_lc, y_dw, rtol=1e-12, atol=1e-12)
    # untying one position's kernel changes the output there only: the comparison can fail
    with torch.no_grad():
        lc.weights.weight[0, 24, 4, 5] += 1.0  # centre tap (24 = 3 * 7 + 3) at (4, 5), group 0
        y_untied = lc(x)
    changed = (y_untied - y_dw).abs().amax(dim=(0, 1)) > 1e-9
    assert changed.nonzero().tolist() == [[4, 5]]


@pytest.mark.parametrize("cpg", [1, 2])
def test_dwconv_equals_depthwise_conv2d(cpg):
    torch.manual_seed(3)
    dim, res, k = 4, (9, 10), 7
    dw = _sliding_mixer("dwconv", dim, res, cpg)
    with torch.no_grad():
        dw.bias.normal_()
    x = torch.randn(2, dim, *res, dtype=torch.float64)
    kernel = dw.weights.weight.detach().repeat_interleave(cpg, dim=0).reshape(dim, 1, k, k)
    expected = F.conv2d(x, kernel, dw.bias.detach(), padding=k // 2, groups=dim)
    with torch.no_grad():
        torch.testing.assert_close(dw(x), expected, rtol=1e-12, atol=1e-12)


def test_dynamic_dwconv_equals_per_instance_conv2d():
    """The batch-folded convolution applies instance n's own predicted kernel to instance n."""
    torch.manual_seed(4)
    dim, res, k = 8, (9, 9), 7
    mixer = SpatialMixer(PRESETS["dynamic_dwconv"].spec, dim, res, channels_per_group=1).double().eval()
    x = torch.randn(3, dim, *res, dtype=torch.float64)
    with torch.no_grad():
        kernels = mixer.weights(x, mixer.layout)  # (N, G, K*K)
        y = mixer(x)
        for n in range(x.shape[0]):
            expected = F.conv2d(x[n: n + 1], kernels[n].reshape(dim, 1, k, k), mixer.bias,
                                padding=k // 2, groups=dim)
            torch.testing.assert_close(y[n: n + 1], expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(kernels[0], kernels[1])  # the instances really have different kernels


def test_window_offset_equals_tied_local_mlp():
    """A static window convolution (spatial offset) is the local MLP with its weight tied by offset."""
    torch.manual_seed(5)
    dim, res, k = 4, (8, 8), 4
    conv_spec = OperatorSpec(Connectivity("window", k, shift=True), Sharing("offset", 2), Dynamic("static"))
    mlp_spec = conv_spec.with_axes(spatial="window")
    conv = SpatialMixer(conv_spec, dim, res, channels_per_group=2, shifted=True).double()
    mlp = SpatialMixer(mlp_spec, dim, res, channels_per_group=2, shifted=True).double()
    with torch.no_grad():
        mlp.bias.copy_(conv.bias)
        mlp.weights.weight.copy_(conv.weights.table[:, conv.layout.relative_index])
    x = torch.randn(2, dim, *res, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), conv(x), rtol=1e-12, atol=1e-12)
