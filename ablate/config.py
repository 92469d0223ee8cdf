"""The structured schema of the Hydra configs, and composed config -> spec -> model.

The YAML files under `conf/` fill these dataclasses, so a misspelt key or an unknown enum value
fails at composition with Hydra's own message. The dynamic axis is open (users register options),
so its `kind` is checked by `ablate.space.validate` with the list of registered options instead.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ablate.data.config import DataConf
from ablate.models.backbone import AblateNet
from ablate.ops.mixer import apply_backend
from ablate.schema import validate_config
from ablate.space.presets import PRESETS
from ablate.space.rules import validate_window
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing, as_tuple

__all__ = ["CONF_DIR", "CONFIG_ROOT", "REPO_ROOT", "ModelSideConfig", "MeasureConfig", "TrainConfig",
           "DownstreamConfig", "spec_from_cfg", "build_model", "operator_label", "check_train_config",
           "schema_of"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# where conf/ and sweeps/ lie: in an installed copy (pip install without -e), the package itself, where
# pyproject.toml puts both; in the checkout (the editable install, `make install`), the repository
_PACKAGE = Path(__file__).resolve().parent
CONFIG_ROOT = _PACKAGE if (_PACKAGE / "conf").is_dir() else REPO_ROOT
CONF_DIR = CONFIG_ROOT / "conf"


def _cpu_share(jobs_in_parallel: int | None) -> int:
    """CPU threads for each of `jobs_in_parallel` jobs on this machine: oversubscribed cores make
    small CPU kernels 10-100x slower (OpenMP threads spin waiting for descheduled partners)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(jobs_in_parallel or 1)))


def sweep_name(sweep: str | None) -> str:
    """The folder of a sweep's runs under trainer.results_root: trainer.sweep, or `runs` when it is
    null (an ad-hoc sweep, a single run)."""
    return sweep or "runs"


# ${ablate_root:} puts sweeps/ on Hydra's search path (conf/train.yaml); ${cpu_share:N} sizes the
# threads of N parallel jobs (conf/launcher/joblib.yaml); ${sweep_name:${trainer.sweep}} names the
# sweep's folder (oc.select falls back only for a missing key, so a null trainer.sweep gave `None`).
OmegaConf.register_new_resolver("ablate_root", lambda: str(CONFIG_ROOT), replace=True)
OmegaConf.register_new_resolver("cpu_share", _cpu_share, replace=True)
OmegaConf.register_new_resolver("sweep_name", sweep_name, replace=True)

ConnectivityKind = enum.Enum("ConnectivityKind", {k: k for k in ("window", "sliding", "global")})
SpatialSharing = enum.Enum("SpatialSharing", {k: k for k in ("offset", "window", "none")})
BlockStyle = enum.Enum("BlockStyle", {k: k for k in ("swin", "dwnet")})
SizeName = enum.Enum("SizeName", {k: k for k in ("micro", "tiny", "small", "base", "custom")})


@dataclass
class ConnectivityConf:
    kind: ConnectivityKind = MISSING
    kernel_size: int = 7
    shift: bool = False


@dataclass
class SharingConf:
    spatial: SpatialSharing = MISSING
    channels_per_group: Any = None  # one int, or a list with one per stage
    groups: int | None = None


@dataclass
class DynamicConf:
    kind: str = MISSING
    reduction: int = 4
    bias: bool = True
    qkv_bias: bool = True
    position_bias: bool = True
    module: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockConf:
    style: BlockStyle = MISSING


@dataclass
class ModelConf:
    size: SizeName = MISSING
    embed_dim: int = MISSING
    depths: list[int] = MISSING
    patch_size: int = MISSING
    mlp_ratio: float = 4.0
    img_size: int = MISSING
    drop_path_rate: float = 0.0
    window: int = 7  # the window / kernel size of this size; conf/connectivity takes it as kernel_size


@dataclass
class OpsConf:
    backend: str = "fast"  # fast: the fast kernels where they apply; reference: the ground truth


@dataclass
class ModelSideConfig:
    """What every app composes: the operator's three axes, the block, the macro model."""

    preset: str = MISSING  # the operator preset the axes started from (conf/operator/)
    connectivity: ConnectivityConf = field(default_factory=ConnectivityConf)
    sharing: SharingConf = field(default_factory=SharingConf)
    dynamic: DynamicConf = field(default_factory=DynamicConf)
    block: BlockConf = field(default_factory=BlockConf)
    model: ModelConf = field(default_factory=ModelConf)
    ops: OpsConf = field(default_factory=OpsConf)


@dataclass
class MeasureConfig(ModelSideConfig):
    img_size: int = "${model.img_size}"  # type: ignore[assignment]
    in_chans: int = 3
    num_classes: int = 1000


@dataclass
class OptimConf:
    lr: float = 5e-4              # at lr_batch_size images per step; scaled by the global batch
    lr_batch_size: int = 512
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema: bool = False
    ema_decay: float = 0.9999


@dataclass
class ScheduleConf:
    """The learning rate per step: a linear warm-up, then the decay. warmup_lr and min_lr are rates at
    optim.lr_batch_size images per step, scaled by the global batch as optim.lr is (Swin's rule)."""

    epochs: int = 300
    warmup_epochs: float = 20.0
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6       # where cosine and poly end (step has no floor)
    # cosine (Swin's ImageNet schedule), step (mmdetection's 3x: x decay_rate at each milestone) or
    # poly (mmsegmentation's: (1 - t/T) ** power down to min_lr)
    decay: str = "cosine"
    milestones: list[float] | None = None  # step: the epochs at which the rate is multiplied
    decay_rate: float = 0.1    # step: the factor at each milestone
    power: float = 1.0         # poly: the exponent


@dataclass
class TrainerConf:
    device: str = "auto"          # auto (cuda if there is one), cpu, cuda, cuda:1 ...
    precision: str = "auto"       # auto (bf16 on a GPU, fp32 on the CPU), bf16, fp32
    channels_last: bool | None = None  # None: on a GPU
    # false; true (torch.compile's default mode); or a mode: reduce-overhead (CUDA graphs: a small
    # model's launches replayed at once), max-autotune, max-autotune-no-cudagraphs
    compile: Any = False
    threads: int | None = None  # CPU threads; None: torch's default
    seed: int = 0
    resume: str = "auto"          # auto: resume from the run folder's checkpoint; never: start over
    results_root: str = "results"
    sweep: str | None = None   # results/<sweep or "runs">/<run>
    run_name: str | None = None  # default: operator-model-data-seed-<hash of the config>
    quiet: bool = False           # no progress bars (launchers)
    inference_batches: int = 5    # batches timed for the inference samples/s
    test_every_epoch: bool = True  # false: the test split after the last epoch only (best_test_*: null)
    rerun_other_code: bool = False  # true: a run finished by other code is trained again beside it
    distributed: bool = False     # DDP under torchrun (trainer=ddp); data.batch_size is per process
    backend: str = "auto"         # auto: nccl on GPUs, gloo on CPUs
    sync_bn: bool = True          # under DDP: BatchNorm statistics over the global batch
    dist_timeout_min: float = 30.0  # a rank waiting this long for its peers gives up


@dataclass
class LoggerConf:
    name: str = "wandb"           # wandb or none
    mode: str | None = None    # online, offline, disabled; None: online with an API key, else offline
    project: str = "ablate"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 60.0


@dataclass
class TrainConfig(ModelSideConfig):
    data: DataConf = field(default_factory=DataConf)
    optim: OptimConf = field(default_factory=OptimConf)
    schedule: ScheduleConf = field(default_factory=ScheduleConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)


@dataclass
class TaskConf:
    name: str = "detection"  # detection (Mask R-CNN, instance masks) | segmentation (UPerNet)
    pretrained: bool = True  # the backbone starts from its classification run; false: from scratch


@dataclass
class PretrainConf:
    """The classification run a downstream run's backbone starts from: these settings with the
    downstream run's operator, model size and seed (ablate/runs.py, `pretraining_config`)."""

    sweep: str = "pretrain"  # results_root/<sweep>/ holds it
    overrides: list[str] = field(default_factory=list)


@dataclass
class DownstreamConfig(TrainConfig):
    """`python -m ablate.downstream`: a training config with a task, its head and its pretraining."""

    task: TaskConf = field(default_factory=TaskConf)
    # the head's settings (conf/head/*.yaml), passed to its model (ablate/models/dense.py); null
    # values take the model size's defaults
    head: dict[str, Any] = field(default_factory=dict)
    pretrain: PretrainConf = field(default_factory=PretrainConf)


ConfigStore.instance().store(name="measure_schema", node=MeasureConfig)
ConfigStore.instance().store(name="train_schema", node=TrainConfig)
ConfigStore.instance().store(name="downstream_schema", node=DownstreamConfig)


def schema_of(cfg: DictConfig) -> type:
    """The dataclass a composed config follows: a downstream one has a task."""
    return DownstreamConfig if "task" in cfg else TrainConfig


def check_train_config(cfg: DictConfig) -> None:
    """Every field of a composed training config in its range (ablate/schema.py), or ConfigError."""
    validate_config(cfg, schema_of(cfg))


def _plain(value):
    return value.name if isinstance(value, enum.Enum) else value


def spec_from_cfg(cfg: DictConfig) -> OperatorSpec:
    """The OperatorSpec of a composed config (not validated yet)."""
    c, s, d = cfg.connectivity, cfg.sharing, cfg.dynamic
    cpg = s.channels_per_group
    if OmegaConf.is_list(cpg):
        cpg = OmegaConf.to_container(cpg)
    return OperatorSpec(
        Connectivity(_plain(c.kind), c.kernel_size, c.shift),
        Sharing(_plain(s.spatial), as_tuple(cpg), s.groups),
        Dynamic(d.kind, d.reduction, d.bias, d.qkv_bias, d.position_bias, d.module,
                OmegaConf.to_container(d.params) if d.params else {}),
    )


def build_model(cfg: DictConfig, img_size: int, in_chans: int, num_classes: int) -> AblateNet:
    """The model of a composed config; raises InvalidOperatorError for an invalid operator."""
    m = cfg.model
    spec = spec_from_cfg(cfg)
    validate_window(spec, m.window)
    model = AblateNet(
        spec, block=_plain(cfg.block.style), embed_dim=m.embed_dim,
        depths=tuple(m.depths), patch_size=m.patch_size, mlp_ratio=m.mlp_ratio, img_size=img_size,
        in_chans=in_chans, num_classes=num_classes, drop_path_rate=m.drop_path_rate,
    )
    return apply_backend(model, OmegaConf.select(cfg, "ops.backend", default="fast"))


def operator_label(cfg: DictConfig) -> str:
    """The preset name, or the preset plus the axes (and settings of its dynamic option) the overrides
    changed ("dwconv[dynamic=...]", "local_attention[position_bias=False]")."""
    base = PRESETS.get(cfg.preset)
    if base is None:
        return str(cfg.preset)
    spec, block = spec_from_cfg(cfg), _plain(cfg.block.style)
    window = OmegaConf.select(cfg, "model.window", default=base.spec.connectivity.kernel_size)
    ours, theirs = spec.axes, base.at_window(window).axes
    changed = [f"{k}={ours[k]}" for k in ours if ours[k] != theirs[k]]
    if spec.dynamic.kind == base.spec.dynamic.kind:
        # the preset's own option with other settings of it (Swin without its position bias) is a
        # variant too; another option's settings have no preset value to differ from
        mine, preset_settings = vars(spec.dynamic), vars(base.spec.dynamic)
        changed += [f"{k}={v}" for k, v in mine.items() if k != "kind" and v != preset_settings[k]]
    if block != base.block:
        changed.append(f"block={block}")
    return base.name if not changed else f"{base.name}[{','.join(changed)}]"
