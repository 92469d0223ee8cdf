"""The Hydra-facing name of ablate's sweeper.

Hydra instantiates sweepers only from modules under the `hydra_plugins` namespace, so pyproject
installs this folder as `hydra_plugins.ablate_sweeper` (package-dir). The sweeper lives in
`ablate.sweep.sweeper`; this subclass only gives it that module path. Select it with
`override hydra/sweeper: grid` (conf/hydra/sweeper/grid.yaml), as conf/train.yaml does.
"""
from ablate.sweep import sweeper


class GridSweeper(sweeper.GridSweeper):
    __doc__ = sweeper.GridSweeper.__doc__


__all__ = ["GridSweeper"]
