"""`python -m ablate.downstream [overrides]`: the paper's other two tasks on ablate's backbones.

    python -m ablate.downstream                                  # detection on the garment scenes
    python -m ablate.downstream task=segmentation                # segmentation on them
    python -m ablate.downstream task.pretrained=false            # from scratch, the baseline
    python -m ablate.downstream model=tiny data=coco data.root=/path/to/coco
    python -m ablate.downstream -m sweeps=downstream             # Tables 3 and 4 (make downstream)

The same command as `ablate.train` (one run or a sweep, the results store, resume, W&B, the one error
path) on conf/downstream.yaml: a task (detection with Mask R-CNN, segmentation with UPerNet), its head
and the classification run its backbone starts from (ablate/tasks/).
"""
from __future__ import annotations

import hydra

from ablate.config import CONF_DIR
from ablate.train import job, run_command

__all__ = ["main", "cli"]

main = hydra.main(config_path=str(CONF_DIR), config_name="downstream", version_base="1.3")(job)


def cli(argv: list[str] | None = None) -> None:
    """`python -m ablate.downstream [args]`."""
    run_command(main, argv, "ablate.downstream")


if __name__ == "__main__":
    cli()
