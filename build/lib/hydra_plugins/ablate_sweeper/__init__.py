"""The Hydra-facing names of ablate's sweeper and SLURM launcher.

Hydra instantiates sweepers only from modules under the `hydra_plugins` namespace, so pyproject
installs this folder as `hydra_plugins.ablate_sweeper` (package-dir). The sweeper lives in
`ablate.sweep.sweeper`; this subclass only gives it that module path. Select it with
`override hydra/sweeper: grid` (conf/hydra/sweeper/grid.yaml), as conf/train.yaml does. The SLURM
launcher (`ablate.sweep.slurm`) is `hydra/launcher: ablate_slurm`, registered here, selected by
conf/launcher/submitit_slurm.yaml.
"""
from hydra.core.config_store import ConfigStore

from ablate.sweep import slurm, sweeper


class GridSweeper(sweeper.GridSweeper):
    __doc__ = sweeper.GridSweeper.__doc__


class SlurmLauncher(slurm.SlurmLauncher):
    __doc__ = slurm.SlurmLauncher.__doc__


ConfigStore.instance().store(group="hydra/launcher", name="ablate_slurm", node=slurm.SlurmConf,
                             provider="ablate")

__all__ = ["GridSweeper", "SlurmLauncher"]
