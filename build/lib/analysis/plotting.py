"""Figures without pyplot: each figure owns an Agg canvas.

pyplot keeps every figure in a global registry (a report drawing many would grow memory and warn)
and picks a backend from the environment (none exists on a cluster node). A Figure with its own
Agg canvas needs neither, and still displays in a notebook.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float], **kwargs) -> Figure:
    """A constrained-layout Figure drawn by Agg."""
    fig = Figure(figsize=figsize, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: Path, formats: tuple[str, ...] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """<stem>.png, <stem>.pdf, ...; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{kind}") for kind in formats]
    for path in paths:
        # no creation date (PDF) or software stamp: the same runs render to the same bytes, so a
        # re-rendered report shows no change
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else {"Software": None}
        fig.savefig(path, dpi=dpi, metadata=metadata)
    return paths
