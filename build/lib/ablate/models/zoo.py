"""Every preset x size registered in timm as `ablate_<preset>_<size>`.

    import ablate, timm
    model = timm.create_model("ablate_dwconv_tiny", num_classes=10)
    features = timm.create_model("ablate_dwconv_tiny", features_only=True)  # four NCHW stage maps

Keyword arguments are AblateNet's (img_size, in_chans, drop_path_rate, ...), plus `spec` or `block`
to swap the operator or the block while keeping the size.
"""
from __future__ import annotations

import sys

from timm.models import build_model_with_cfg, register_model

from ablate.models.backbone import SIZES, AblateNet
from ablate.space.presets import PRESETS

__all__ = ["create", "model_names"]


def create(preset_name: str, size: str, pretrained: bool = False, **kwargs) -> AblateNet:
    preset, dims = PRESETS[preset_name], SIZES[size]
    args = dict(spec=preset.at_window(dims.window), block=preset.block, embed_dim=dims.embed_dim,
                depths=dims.depths, patch_size=dims.patch_size, mlp_ratio=dims.mlp_ratio,
                img_size=dims.img_size, drop_path_rate=dims.drop_path_rate)
    # timm's create_model passes its own cfg (maybe None) and the user's pretrained_cfg_overlay
    given = {**(kwargs.pop("pretrained_cfg", None) or {}),
             **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    args.update(kwargs)
    variant = f"ablate_{preset_name}_{size}"
    cfg = dict(dict(architecture=variant, num_classes=args.get("num_classes", 1000),
                    input_size=(args.get("in_chans", 3), *_pair(args["img_size"])),
                    first_conv="stem.0", classifier="head"), **given)
    model = build_model_with_cfg(
        AblateNet, variant, pretrained, pretrained_cfg=cfg,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **args,
    )
    # what timm's data and benchmark tools read: whether a layer is laid out for img_size (windows,
    # per-position weights; SpatialMixer refuses another map) or the model takes any size (dwconv)
    if given.get("fixed_input_size") is None:  # not the user's to keep: timm's default is False
        model.pretrained_cfg["fixed_input_size"] = any(getattr(m, "size_bound", False)
                                                       for m in model.modules())
    return model


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _register(preset_name: str, size: str) -> str:
    name = f"ablate_{preset_name}_{size}"

    def entry(pretrained: bool = False, **kwargs) -> AblateNet:
        return create(preset_name, size, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"{PRESETS[preset_name].note}; {size} size."
    setattr(sys.modules[__name__], name, entry)
    register_model(entry)
    return name


_NAMES = [_register(p, s) for p in PRESETS for s in SIZES]


def model_names() -> list[str]:
    return list(_NAMES)
