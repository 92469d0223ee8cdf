"""Named points of the operator space: the paper's models and the references around them.

Each preset is one option per axis plus the block the paper used with it (so parameter counts
reproduce the paper). Its window / kernel size is the paper's 7; a model size may scale it
(`Preset.at_window`), as conf/connectivity takes it from `model.window`.
`conf/operator/<name>.yaml` selects the same options in Hydra; a test checks that both agree.
"""
from __future__ import annotations

from dataclasses import dataclass

from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing

__all__ = ["Preset", "PRESETS", "PAPER", "preset"]

_WINDOW = Connectivity("window", 7, shift=True)
_SLIDING = Connectivity("sliding", 7)
_GLOBAL = Connectivity("global", 7)

_STATIC = Dynamic("static", bias=True)
_HOMOGENEOUS = Dynamic("homogeneous", bias=True)
_INHOMOGENEOUS = Dynamic("inhomogeneous", bias=False)
_ATTENTION = Dynamic("attention", bias=False)


@dataclass(frozen=True)
class Preset:
    name: str
    spec: OperatorSpec
    block: str  # the block style the paper used: "swin" or "dwnet"
    note: str

    def at_window(self, window: int) -> OperatorSpec:
        """The operator at a model size's window / kernel size (`ModelSize.window`, `model.window`):
        the specs above carry the paper's 7, which the smaller sizes scale down."""
        return self.spec.with_axes(kernel_size=window)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("local_attention", OperatorSpec(_WINDOW, Sharing("none", 32), _ATTENTION), "swin",
           "Swin: window attention, one head per 32 channels"),
    Preset("local_mlp", OperatorSpec(_WINDOW, Sharing("window", 32), _STATIC), "swin",
           "the static version of Swin (Fig. 2a sweeps channels_per_group)"),
    Preset("dwconv", OperatorSpec(_SLIDING, Sharing("offset", 1), _STATIC), "dwnet",
           "DWNet: 7x7 depth-wise convolution"),
    Preset("dynamic_dwconv", OperatorSpec(_SLIDING, Sharing("offset", 1), _HOMOGENEOUS), "dwnet",
           "D-DWNet: per-instance kernels from pooled features"),
    Preset("idynamic_dwconv", OperatorSpec(_SLIDING, Sharing("none", None, groups=32), _INHOMOGENEOUS),
           "dwnet", "I-D-DWNet: per-position kernels, 32 weight groups per stage (official code)"),
    Preset("global_attention", OperatorSpec(_GLOBAL, Sharing("none", 32), _ATTENTION), "swin",
           "ViT-style attention over the whole map"),
    Preset("token_mlp", OperatorSpec(_GLOBAL, Sharing("window", None, groups=1), _STATIC), "swin",
           "MLP-Mixer-style token mixing: one map-sized weight, all channels share it"),
    Preset("locally_connected", OperatorSpec(_SLIDING, Sharing("none", 1), _STATIC), "dwnet",
           "a 7x7 kernel per position and channel (fixed input size)"),
    Preset("neighborhood_attention", OperatorSpec(_SLIDING, Sharing("none", 32), _ATTENTION), "swin",
           "NAT-style: attention over each position's own 7x7 neighbourhood"),
)}

# The paper's ImageNet-1K models at 224 px, 1000 classes: (params in M, GMAC, top-1 or None).
PAPER: dict[tuple[str, str], tuple[float, float, str | None]] = {
    ("local_attention", "tiny"): (28.29, 4.5, "81.3"),
    ("dwconv", "tiny"): (24.17, 3.8, "81.2-81.3"),
    ("dynamic_dwconv", "tiny"): (51.13, 3.8, "81.8-81.9"),
    ("idynamic_dwconv", "tiny"): (26.24, 4.4, "81.8"),
    ("local_attention", "base"): (87.77, 15.4, None),
    ("dwconv", "base"): (74.35, 12.9, None),
    ("dynamic_dwconv", "base"): (161.60, 13.0, None),
    ("idynamic_dwconv", "base"): (80.25, 14.3, None),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
