"""The weights each operator actually applies, drawn from trained checkpoints: the paper's thesis, visible.

Every operator is y[n, c, i] = sum over j of w[n, g(c), i, j] x[n, c, j], and `SpatialMixer.
effective_weights` hands out w for chosen output positions i. Drawn for a few real test images
(rows) and positions (columns), the axes show directly: a static convolution draws the same kernel
everywhere, a dynamic one changes with the image, attention changes with the image and the position.

Two numbers summarise a map set, both comparing kernels in relative coordinates (a crop of
(2r+1)^2 offsets centred at the position, at interior positions so that zero padding does not
count as a difference), normalised by the mean |w|:
    across_images:    the spread over images at the same position (0 for static weights);
    across_positions: the spread over positions for the same image (0 for weights shared over
                      offsets, `spatial: offset`).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from analysis.plotting import new_figure, save_figure
from analysis.records import completed

__all__ = ["WeightMaps", "select_weight_runs", "load_run_model", "test_images", "capture_mixer_input",
           "default_positions", "relative_kernels", "weight_variation", "weight_maps", "plot_weights"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WeightMaps:
    """The effective weights of one mixer of one trained run.

    weights: (images, groups, positions, H, W), the map over all j for each chosen i.
    """

    preset: str
    operator: str
    run: str
    stage: int
    positions: list[tuple[int, int]]
    weights: torch.Tensor
    labels: list[str]
    radius: int
    across_images: float
    across_positions: float


def select_weight_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One completed run with a checkpoint per preset: the preset itself (no overridden axis) over a
    variant of it, and seed 0 over other seeds, so that the figure shows the named operators."""
    done = completed(runs)
    # a flag per row, as a Series: an empty list (no completed run) would select no columns
    done = done[done["path"].map(lambda p: Path(p, "checkpoint.pt").is_file()).astype(bool)]
    if done.empty:
        return done
    rank = pd.DataFrame({"variant": (done["operator"] != done["preset"]).astype(int),
                         "seed_rank": [0 if s == 0 else 1 for s in done["seed"]],
                         "seed": done["seed"].astype(float), "run": done["run"]})
    order = rank.sort_values(["variant", "seed_rank", "seed", "run"]).index
    return done.loc[order].drop_duplicates("preset").sort_values("preset").reset_index(drop=True)


def load_run_model(folder: str | Path) -> tuple[torch.nn.Module, DictConfig]:
    """The trained model of a run folder (its config.yaml and checkpoint.pt), in eval mode."""
    from ablate.config import build_model  # ablate imports torch and Hydra: only when weights are drawn

    folder = Path(folder)
    cfg = OmegaConf.load(folder / "config.yaml")
    model = build_model(cfg, cfg.data.img_size, cfg.data.in_chans, cfg.data.num_classes)
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def test_images(cfg: DictConfig, count: int = 3) -> tuple[torch.Tensor, list[str]]:
    """`count` real test images of the run's data set, normalised as in training, and their classes.

    The stratified test subset is drawn with a fixed seed, so every run of one data set gets the
    same images. A relative data.root is tried from the working directory, then from the repository.
    """
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    root = Path(data_cfg["root"])
    if not root.is_absolute() and not root.exists() and (REPO_ROOT / root).exists():
        data_cfg["root"] = str(REPO_ROOT / root)
    data_cfg["download"] = False  # never reach for the internet while drawing a figure
    data_cfg["test_subset"] = max(count, data_cfg["num_classes"])  # the smallest stratified subset
    data_cfg["eval_batch_size"] = data_cfg["test_subset"]
    images, labels, classes = _first_test_batch(json.dumps(data_cfg, sort_keys=True))
    names = [classes[i] if i < len(classes) else f"class {i}" for i in labels[:count].tolist()]
    return images[:count], names


@functools.lru_cache(maxsize=4)
def _first_test_batch(data_cfg: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Cached per data config: every preset of a report is drawn on the same images, read once."""
    from ablate.data import build_data

    data = build_data(json.loads(data_cfg), torch.device("cpu"), seed=0)
    images, labels = next(iter(data.test))
    return images, labels, list(data.classes)


def capture_mixer_input(model: torch.nn.Module, images: torch.Tensor, stage: int = 0):
    """(mixer, x, context) of the first mixer of `stage` on `images`: what forward handed it.

    The Swin block computes the weights from LN(x) and passes it as `context`; the DWNet block passes
    none. A forward hook sees both, so the weights are those of the real forward pass.
    """
    from ablate.ops.mixer import SpatialMixer

    mixer = next(m for m in model.stages[stage].modules() if isinstance(m, SpatialMixer))
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = args[0]
        seen["context"] = kwargs.get("context", args[1] if len(args) > 1 else None)

    handle = mixer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return mixer, seen["x"], seen["context"]


def default_positions(height: int, width: int, radius: int) -> list[tuple[int, int]]:
    """Three interior positions on the diagonal: near the top-left, the centre, near the bottom-right."""
    top, bottom = radius, height - 1 - radius
    left, right = radius, width - 1 - radius
    if top > bottom or left > right:
        raise ValueError(f"a {height}x{width} map has no position {radius} away from every border")
    positions = [(top, left), (height // 2, width // 2), (bottom, right)]
    return list(dict.fromkeys(positions))


def relative_kernels(weights: torch.Tensor, positions: Sequence[tuple[int, int]],
                     radius: int) -> torch.Tensor:
    """(N, G, P, 2r+1, 2r+1): each position's map cut around the position (offset coordinates)."""
    crops = [weights[:, :, p, h - radius:h + radius + 1, c - radius:c + radius + 1]
             for p, (h, c) in enumerate(positions)]
    return torch.stack(crops, dim=2)


def weight_variation(weights: torch.Tensor, positions: Sequence[tuple[int, int]],
                     radius: int) -> tuple[float, float]:
    """(across_images, across_positions): mean std of the relative kernels over images (same
    position) and over positions (same image), divided by their mean |w|. NaN with one image or one
    position (nothing to compare)."""
    kernels = relative_kernels(weights, positions, radius).double()
    scale = kernels.abs().mean().item()
    if scale == 0:
        return 0.0, 0.0

    def spread(dim):
        if kernels.shape[dim] < 2:
            return float("nan")
        return kernels.std(dim=dim, unbiased=False).mean().item() / scale

    return spread(0), spread(2)


def weight_maps(folder: str | Path, images: int = 3, stage: int = 0,
                positions: Sequence[tuple[int, int]] | None = None) -> WeightMaps:
    """The effective weights of the first mixer of `stage` of a trained run, on real test images."""
    model, cfg = load_run_model(folder)
    x_images, labels = test_images(cfg, images)
    mixer, x, context = capture_mixer_input(model, x_images, stage)
    height, width = x.shape[-2:]
    radius = min(int(cfg.connectivity.kernel_size) // 2, (min(height, width) - 1) // 2)
    positions = list(positions) if positions is not None else default_positions(height, width, radius)
    weights = mixer.effective_weights(x, positions, context)
    across_images, across_positions = weight_variation(weights, positions, radius)
    return WeightMaps(preset=str(cfg.preset), operator=_operator(folder, cfg), run=str(folder), stage=stage,
                      positions=positions, weights=weights, labels=labels, radius=radius,
                      across_images=across_images, across_positions=across_positions)


def _operator(folder, cfg) -> str:
    from ablate.config import operator_label

    return operator_label(cfg)


def plot_weights(maps: Sequence[WeightMaps], out_path: Path | None = None, group: int = 0):
    """Per run: rows = images, columns = positions, the map of weight group `group` (the position
    marked with x; one colour scale per run: red positive and blue negative, or, for weights that
    are never negative such as attention's softmax, dark = large). None without maps."""
    if not maps:
        return None
    rows = max(m.weights.shape[0] for m in maps)
    cols = max(len(m.positions) for m in maps)
    fig = new_figure((2.0 * cols * len(maps) + 0.5, 2.0 * rows + 1.0))
    panels = fig.subfigures(1, len(maps), squeeze=False)[0]
    for panel, m in zip(panels, maps):
        w = m.weights[:, min(group, m.weights.shape[1] - 1)].numpy()  # (N, P, H, W)
        limit = float(np.abs(w).max()) or 1.0
        signed = bool((w < 0).any())
        cmap, vmin = ("RdBu_r", -limit) if signed else ("Greys", 0.0)
        axes = panel.subplots(rows, cols, squeeze=False)
        for r in range(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if r >= w.shape[0] or c >= w.shape[1]:
                    ax.set_visible(False)
                    continue
                ax.imshow(w[r, c], cmap=cmap, vmin=vmin, vmax=limit, interpolation="nearest")
                h, x = m.positions[c]
                ax.plot([x], [h], "x", color="black" if signed else "red", markersize=5)
                if r == 0:
                    ax.set_title(f"i = {m.positions[c]}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"image {r}: {m.labels[r]}", fontsize=7)
        panel.suptitle(f"{m.operator}\nacross images {m.across_images:.3f}, "
                       f"across positions {m.across_positions:.3f}", fontsize=9)
    if out_path is not None:
        out_path = Path(out_path)
        save_figure(fig, out_path.with_suffix(""), formats=(out_path.suffix.lstrip(".") or "png",))
    return fig
