"""Every preset x size registered in timm as `ablate_<preset>_<size>`.

    import ablate, timm
    model = timm.create_model("ablate_dwconv_tiny", num_classes=10)
    features = timm.create_model("ablate_dwconv_tiny", features_only=True)  # four NCHW stage maps
    # a classification run's trained model, its head kept (or dropped: another num_classes)
    trained = timm.create_model("ablate_dwconv_micro", in_chans=1, img_size=28, pretrained=True,
                                pretrained_cfg_overlay=dict(file="results/runs/<run>/checkpoint.pt"))

Keyword arguments are AblateNet's (img_size, in_chans, drop_path_rate, ...), plus `spec` or `block`
to swap the operator or the block while keeping the size.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from timm.models import build_model_with_cfg, load_state_dict, register_model

from ablate.models.backbone import SIZES, AblateNet
from ablate.models.weights import evaluated_weights, fit_position_tables, is_run_checkpoint
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
    if pretrained and not any(cfg.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        raise RuntimeError(f"No pretrained weights exist for {variant}: ablate publishes none. Give a "
                           "file, a run's checkpoint.pt included: pretrained_cfg_overlay=dict(file=...), or "
                           "use pretrained=False for random init.")  # timm's type and first words
    run = None  # the training run whose checkpoint is the pretrained file, if it is one
    if pretrained and cfg.get("file") and cfg.get("state_dict") is None and cfg.get("source") != "local-dir":
        cfg, run = _described_by_file(cfg, given)
    try:
        model = build_model_with_cfg(
            AblateNet, variant, pretrained, pretrained_cfg=cfg,
            # a window stage's position tables at another input size: resized, as Swin fine-tunes
            pretrained_filter_fn=lambda weights, net: fit_position_tables(weights, net.state_dict()),
            feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
            **args,
        )
    except RuntimeError as err:  # torch's list of every missing key, where the run is another model
        if run is None or "loading state_dict" not in str(err):
            raise
        preset_of, size_of = run.get("preset"), (run.get("model") or {}).get("size")
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        if first.startswith(("Missing", "Unexpected")):  # a list of every key: its first says enough
            first = first.split(", ")[0] + ", ..."
        raise ValueError(f"{cfg['file']} holds a run of {preset_of} at size {size_of}, whose weights do not "
                         f"fit {variant} ({first}): create ablate_{preset_of}_{size_of}, with the "
                         "run's axis settings and img_size (its config.yaml)") from None
    model.pretrained_cfg.pop("state_dict", None)  # the weights, loaded: the model need not hold a copy
    # what timm's data and benchmark tools read: whether a layer is laid out for img_size (windows,
    # per-position weights; SpatialMixer refuses another map) or the model takes any size (dwconv)
    if given.get("fixed_input_size") is None:  # not the user's to keep: timm's default is False
        model.pretrained_cfg["fixed_input_size"] = any(getattr(m, "size_bound", False)
                                                       for m in model.modules())
    return model


def _described_by_file(cfg: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """A local weight file describes itself: timm takes the pretrained cfg's num_classes and input
    channels for the file's (it drops the head, or adapts the stem, where the model's differ), and no
    hub entry states them for a file of the user's. They are read from the file's head and stem, unless
    the user's overlay gives them. A training run's checkpoint gives the weights its metrics describe
    (the EMA's where the run kept one); timm alone would read its trained weights. Returns the cfg and
    the run's identity (None for another file)."""
    try:
        state = torch.load(cfg["file"], map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  not a run's checkpoint (a legacy file, pickled objects): timm's to read
        state = None
    run = None
    if is_run_checkpoint(state):
        run = state["identity"] if isinstance(state.get("identity"), dict) else {}
        weights = evaluated_weights(state)
    else:  # as timm reads a file: its state_dict, model or EMA entry
        weights = load_state_dict(cfg["file"])
    described = dict(cfg, state_dict=weights)
    if "num_classes" not in given:
        head = weights.get("head.weight")
        described["num_classes"] = 0 if head is None else head.shape[0]
    stem = weights.get("stem.0.weight")
    if "input_size" not in given and stem is not None:
        described["input_size"] = (stem.shape[1], *cfg["input_size"][1:])
    return described, run


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
