"""`python -m ablate.measure`: parameters and analytic GMAC of composed models, one JSON line each.

    python -m ablate.measure operator=dwconv model=tiny img_size=224 num_classes=1000
    python -m ablate.measure -m operator=dwconv,local_attention model=tiny

GMAC (1e9 multiply-accumulates per image, the Swin/timm/fvcore convention) come from analytic
per-module formulas: counters miss the shift-and-accumulate operators. The model is built on the
meta device, so base-size models measure in a moment without allocating their weights.
"""
from __future__ import annotations

import json

import hydra
import torch
from omegaconf import DictConfig

import ablate  # noqa: F401  (registers the operator options)
from ablate.cli import run_cli
from ablate.config import CONF_DIR, MeasureConfig, build_model, operator_label
from ablate.schema import MEASURE_RULES, validate_config

__all__ = ["measure"]


def measure(cfg: DictConfig) -> dict:
    with torch.device("meta"):
        model = build_model(cfg, cfg.img_size, cfg.in_chans, cfg.num_classes)
    return {
        "operator": operator_label(cfg),
        "model": cfg.model.size.name,
        "img_size": cfg.img_size,
        "num_classes": cfg.num_classes,
        "params_m": _significant(sum(p.numel() for p in model.parameters()) / 1e6, 5),
        "gmac": _significant(model.macs() / 1e9, 4),
    }


def _significant(value: float, digits: int) -> float:
    """Round to significant digits: 24.173 for a tiny model, 0.01679 for a micro one."""
    return float(f"{value:.{digits}g}")


@hydra.main(config_path=str(CONF_DIR), config_name="measure", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate_config(cfg, MeasureConfig, MEASURE_RULES)
    print(json.dumps(measure(cfg)), flush=True)


if __name__ == "__main__":
    run_cli(main, hydra_app=True)
