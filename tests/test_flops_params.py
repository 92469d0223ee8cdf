"""Parameter counts and analytic MACs: against the paper, and against PyTorch's FLOP counter.

Conventions: GMAC (one multiply-accumulate = 1; Swin, timm, fvcore), while
`torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per MAC.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import ablate
from ablate.models.backbone import SIZES
from ablate.space.presets import PAPER, PRESETS

# ------------------------------------------------------------------------------------------------
# the paper's models: ImageNet-1K, 224 px, 1000 classes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,size", sorted(PAPER), ids=[f"{p}-{s}" for p, s in sorted(PAPER)])
def test_params_and_macs_match_paper(preset, size):
    params_m, gmac, _ = PAPER[(preset, size)]
    # on the meta device: shapes without storage or init (a base model builds in 0.2 s, not 4 s)
    with torch.device("meta"):
        model = timm.create_model(f"ablate_{preset}_{size}")
    assert isinstance(model, ablate.AblateNet)
    assert model.spec == PRESETS[preset].spec and model.block == PRESETS[preset].block
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(params_m, rel=0.005), f"{params:.3f}M vs paper {params_m}M"
    macs = model.macs() / 1e9
    assert macs == pytest.approx(gmac, rel=0.05), f"{macs:.3f} GMAC vs paper {gmac}"


def test_meta_device_build_counts_like_a_real_one():
    with torch.device("meta"):
        meta = timm.create_model("ablate_idynamic_dwconv_tiny")
    real = timm.create_model("ablate_idynamic_dwconv_tiny")
    assert next(meta.parameters()).is_meta and not next(real.parameters()).is_meta
    assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]
    assert meta.macs() == real.macs()


def test_timm_features_only_returns_four_nchw_maps():
    model = timm.create_model("ablate_local_attention_micro", features_only=True, in_chans=1)
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [2, 4, 8, 16]
    with torch.no_grad():
        features = model.eval()(torch.randn(2, 1, 28, 28))
    assert [tuple(f.shape) for f in features] == [
        (2, 32, 14, 14), (2, 64, 7, 7), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert all(torch.isfinite(f).all() for f in features)



def test_timm_config_says_whether_the_input_size_is_fixed():
    """Windowed layers are laid out for img_size (a map of another size is refused), so the config
    timm hands to its data and benchmark tools says so, as it does for its own Swin (a depth-wise
    convolution takes any size: tests/test_grid.py); a user's pretrained_cfg_overlay wins. The config
    names the stem and the classifier (what timm adapts to in_chans and num_classes)."""
    model = timm.create_model("ablate_local_attention_micro", in_chans=1, num_classes=10, img_size=32)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["fixed_input_size"] is True
    overlay = dict(fixed_input_size=True, crop_pct=1.0)
    given = timm.create_model("ablate_dwconv_micro", pretrained_cfg_overlay=overlay).pretrained_cfg
    assert given["fixed_input_size"] is True and given["crop_pct"] == 1.0
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert modules[cfg["classifier"]] is model.get_classifier()


def test_timm_global_pool_options():
    """timm's pools: avg, max, and '' (the unpooled map, without a classifier); any other is refused by
    name. 'max' and every other name left the map unpooled for the classifier, a shape error in its
    matrix product."""
    x = torch.randn(2, 1, 28, 28)
    model = timm.create_model("ablate_dwconv_micro", in_chans=1, num_classes=10, global_pool="max").eval()
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model(x), model.head(features.amax(dim=(2, 3))))
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 256, 2, 2)
    for pool, classes in (("avgmax", 10), ("", 10)):
        with pytest.raises(ValueError, match=f"global_pool='{pool}'"):
            timm.create_model("ablate_dwconv_micro", in_chans=1, num_classes=classes, global_pool=pool)
    with pytest.raises(ValueError, match="global_pool='token'"):
        model.reset_classifier(10, "token")

# ------------------------------------------------------------------------------------------------
# the analytic formulas against FlopCounterMode
# ------------------------------------------------------------------------------------------------
# What the counter counts: convolutions, mm/addmm/bmm (einsum lowers to bmm), scaled-dot-product
# kernels other than CPU's. Neither it nor `macs()` counts norms, activations, softmax, pooling,
# bias additions or masking. So where every MAC of a model is a convolution or a matmul, the two
# must agree exactly (the tolerance below is float rounding only). They do not agree where the
# operator multiplies elementwise: shift-and-accumulate (per-position sliding weights) and the
# neighbourhood-attention logits are `mul` + `add`/`sum`, which the counter sees as 0 FLOPs. For
# those we subtract exactly these parts from the analytic count and compare the rest.

MATMUL_PRESETS = ["dwconv", "dynamic_dwconv", "local_attention", "local_mlp", "global_attention",
                  "token_mlp"]
ELEMENTWISE_PRESETS = ["idynamic_dwconv", "locally_connected", "neighborhood_attention"]
assert sorted(MATMUL_PRESETS + ELEMENTWISE_PRESETS) == sorted(PRESETS)  # a new preset lands here


def _counted_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:  # no torch.no_grad(): the counter's module tracker needs autograd on
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]  # FLOPs -> MACs, per image


def _micro(preset: str, img_size: int) -> ablate.AblateNet:
    # 28 px: maps of 14, 7, 4, 2 padded to windows of 3; 32 px: 16, 8, 4, 2
    return ablate.create(preset, "micro", in_chans=1, num_classes=10, img_size=img_size).eval()


@pytest.mark.parametrize("img_size", [28, 32])
@pytest.mark.parametrize("preset", MATMUL_PRESETS)
def test_macs_equal_flop_counter(preset, img_size):
    torch.manual_seed(0)
    model = _micro(preset, img_size)
    counted = _counted_macs(model, torch.randn(2, 1, img_size, img_size))
    assert counted == pytest.approx(model.macs(), rel=1e-9)


def _elementwise_macs(mixer) -> int:
    """The analytic MACs of the parts the counter cannot see."""
    from ablate.ops.backend import resolve
    from ablate.ops.fast import predicted

    if predicted.applies(mixer.weights, mixer.layout, torch.empty(0)) and resolve(mixer.backend) == "fast":
        return 0  # I-D-DW conv at one channel per group runs as one convolution: the counter sees it all
    h, w = mixer.layout.resolution
    missing = h * w * mixer.dim * mixer.layout.tokens  # shift-and-accumulate aggregation
    if mixer.spec.dynamic.kind == "attention":  # logits: (q * k_j).sum over the head's channels
        missing += h * w * mixer.dim * mixer.layout.tokens
    return missing


@pytest.mark.parametrize("img_size", [28, 32])
@pytest.mark.parametrize("preset", ELEMENTWISE_PRESETS)
def test_macs_minus_elementwise_parts_equal_flop_counter(preset, img_size):
    torch.manual_seed(0)
    model = _micro(preset, img_size)
    counted = _counted_macs(model, torch.randn(2, 1, img_size, img_size))
    missing = sum(_elementwise_macs(m) for m in model.mixers())
    assert missing > 0.005 * model.macs()  # the subtracted part is not negligible (0.7-1.9% at 3x3) ...
    assert counted == pytest.approx(model.macs() - missing, rel=1e-9)  # ... and is all that differs


@pytest.mark.parametrize("preset", list(PRESETS))
def test_mixer_macs_equal_flop_counter_per_module(preset):
    """Per module: each mixer's weight-source formula against what the counter sees inside it (in a
    Swin block, plus the value projection the block hands to it)."""
    torch.manual_seed(0)
    model = _micro(preset, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(2, 1, 32, 32))
    per_module = counter.get_flop_counts()
    names = {m: n for n, m in model.named_modules()}
    mixers = model.mixers()
    assert len(mixers) == sum(SIZES["micro"].depths)
    for mixer in mixers:
        key = f"{type(model).__name__}.{names[mixer]}"
        counted = sum(per_module.get(key, {}).values()) / 2 / 2
        elementwise = mixer.layout.kind == "sliding" and mixer.spec.sharing.spatial == "none"
        expected = mixer.macs() - (_elementwise_macs(mixer) if elementwise else 0)
        if model.block == "swin":  # the Swin block hands its value projection (in_proj) to the mixer
            h, w = mixer.layout.resolution
            expected += h * w * mixer.dim * mixer.dim
        if expected:  # the counter saw this mixer under the name we look it up by
            assert key in per_module, (key, list(per_module)[:5])
        assert counted == pytest.approx(expected, rel=1e-9), key
