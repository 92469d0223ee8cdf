"""What each mixing layer of a model sees: windows per side, shifts, and how much of the map one
position reaches.

The paper's question (what sparse connectivity contributes) only has an answer on a model whose
windows are smaller than its maps. Swin-T at 224 px has maps of 56, 28, 14, 7 and 7x7 windows: 8, 4
and 2 windows per side in the first three stages, half of those blocks shifted, 10 of 12 mixing
layers local. `stage_rows` states the same facts for any model, `geometry_table` prints them for the
named sizes (the README's table), and tests/test_geometry.py checks them against the layers' actual
effective weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ablate.models.backbone import SIZES, AblateNet

__all__ = ["LayerView", "layer_views", "stage_rows", "geometry_table", "GEOMETRY_COLUMNS", "main"]


@dataclass(frozen=True)
class LayerView:
    """One mixing layer's connectivity: how far one output position reaches on its map."""

    stage: int  # 1-based
    block: int  # 0-based within the stage
    map: tuple[int, int]
    kind: str  # "windowed" or "sliding"
    window: tuple[int, int]  # the window (windowed) or kernel (sliding) size, after shrinking to the map
    windows: tuple[int, int]  # windows per side (windowed; 1, 1 for sliding)
    padded: tuple[int, int]  # the map padded to whole windows (windowed), else the map
    shifted: bool
    reach: int  # the most positions that feed one output position

    @property
    def positions(self) -> int:
        return self.map[0] * self.map[1]

    @property
    def local(self) -> bool:
        """Whether one position sees less than the whole map."""
        return self.reach < self.positions


def layer_views(model: AblateNet) -> list[LayerView]:
    views = []
    for s, stage in enumerate(model.stages, 1):
        for b, block in enumerate(stage.blocks):
            layout = block.mixer.layout
            h, w = layout.resolution
            if layout.kind == "sliding":
                k = layout.kernel_size  # the position at the centre of the map reaches furthest
                views.append(LayerView(s, b, (h, w), "sliding", (k, k), (1, 1), (h, w), False,
                                       min(k, h) * min(k, w)))
            else:
                views.append(LayerView(s, b, (h, w), "windowed", layout.window, layout.grid, layout.padded,
                                       any(layout.shift), layout.tokens))
    return views


GEOMETRY_COLUMNS = ("stage", "map", "blocks", "window", "windows per side", "shifted blocks",
                    "window sees", "kernel", "kernel sees")


def _share(seen: int, positions: int) -> str:
    return f"{seen}/{positions} ({100 * seen / positions:.0f}%)"


def stage_rows(windowed: AblateNet, sliding: AblateNet) -> list[dict[str, str]]:
    """Per stage: the map, the window attention model's windows per side and shifted blocks, and
    the share of the map one position reaches with a window and with a sliding kernel."""
    by_stage: dict[int, list[tuple[LayerView, LayerView]]] = {}
    for win, sli in zip(layer_views(windowed), layer_views(sliding), strict=True):
        by_stage.setdefault(win.stage, []).append((win, sli))
    rows = []
    for s, layers in by_stage.items():
        win, sli = layers[0]
        h, w = win.map
        gh, gw = win.windows
        per_side = f"{gh}" if gh == gw else f"{gh}x{gw}"
        if win.padded != win.map:
            per_side += f" (padded to {win.padded[0]})"
        rows.append({
            "stage": str(s), "map": f"{h}x{w}", "blocks": str(len(layers)),
            "window": f"{win.window[0]}x{win.window[1]}", "windows per side": per_side,
            "shifted blocks": str(sum(v.shifted for v, _ in layers)),
            "window sees": _share(win.reach, win.positions),
            "kernel": f"{sli.window[0]}x{sli.window[1]}", "kernel sees": _share(sli.reach, sli.positions),
        })
    return rows


def _model(preset_name: str, size: str) -> AblateNet:
    from ablate.models.zoo import create

    with torch.device("meta"):
        return create(preset_name, size, num_classes=10)


def geometry_table(sizes=("micro", "tiny")) -> str:
    """The README's geometry table: every stage of local_attention (windows) and dwconv (kernel)."""
    lines = ["| size | " + " | ".join(GEOMETRY_COLUMNS) + " |", "|---|" + "---:|" * len(GEOMETRY_COLUMNS)]
    for size in sizes:
        windowed, sliding = _model("local_attention", size), _model("dwconv", size)
        local = sum(v.local for v in layer_views(windowed))
        label = f"{size} ({SIZES[size].img_size} px, patch {SIZES[size].patch_size}; {local} of " \
                f"{len(layer_views(windowed))} attention layers local)"
        for row in stage_rows(windowed, sliding):
            lines.append(f"| {label} | " + " | ".join(row[c] for c in GEOMETRY_COLUMNS) + " |")
            label = ""
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m ablate.models.geometry [--sizes ...]`: the table, micro and tiny by default. Bad flags
    end through argparse (exit 2): this layer cannot reach ablate.cli."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ablate.models.geometry",
                                description=main.__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["micro", "tiny"],
                   help="model sizes (default: micro tiny, the README's table)")
    a = p.parse_args(argv)
    print(geometry_table(tuple(a.sizes)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
