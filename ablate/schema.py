"""The range of every config field, in one table, checked before anything is built.

The dataclasses of ablate/config.py and ablate/data/config.py give each field its type (OmegaConf
refuses a value of the wrong type at composition, naming the key); RULES gives each field what a
type cannot say: a range, a set of names, a list's length. `validate_config` walks every field of the
schema (a field without a rule is a programming error, so the table cannot fall behind the schema)
and raises one ConfigError listing every wrong value with what to set instead.

Relations between fields (warmup shorter than training, an image size that is a multiple of the
patch, an operator valid at the model's widths and maps) are checked by the code that owns them
(ablate.recipe, ablate.models, ablate.space.rules), through the same error path (ablate.cli).

It knows field names, not the config's classes: callers pass the dataclass to check against (so
the data layer checks its own fields here without importing the whole config), and a field typed by
an Enum is checked against that Enum, read from the field's own annotation.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from ablate.errors import ConfigError

__all__ = ["ConfigError", "Rule", "Number", "Choice", "Text", "Flag", "FlagOr", "COMPILE_MODES", "Pattern",
           "Numbers", "Texts", "Mapping", "Enumerated", "RULES", "MEASURE_RULES", "schema_fields",
           "validate_config"]


class Rule:
    """What one field accepts. `problem` says what is wrong with a value (None: nothing)."""

    nullable = False

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        return (value is None and self.nullable) or (value is not None and self.problem(value) is None)


@dataclass(frozen=True)
class Number(Rule):
    """A finite number in [low, high] (open at either end when asked); `integer` refuses fractions."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    null_means: str = ""  # what null does, for the message

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        text = f"{kind} {' and '.join(parts)}".strip()
        return text + (f", or null ({self.null_means})" if self.nullable and self.null_means else
                       ", or null" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            return f"must be {self.describe()}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {self.describe()}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {self.describe()}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Choice(Rule):
    """One of a few names."""

    options: tuple[str, ...]
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in self.options:
            return None
        return "must be one of " + ", ".join(self.options) + (", or null" if self.nullable else "")


@dataclass(frozen=True)
class Enumerated(Rule):
    """A field typed by an Enum: OmegaConf checks the name at composition; this checks it again."""

    enum_type: type[enum.Enum]

    def problem(self, value: Any) -> str | None:
        names = [m.name for m in self.enum_type]
        name = value.name if isinstance(value, enum.Enum) else value
        return None if name in names else "must be one of " + ", ".join(names)


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string without control characters (a name, a path)."""

    nullable: bool = False
    what: str = "a non-empty string"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value.strip() and not any(ord(c) < 32 for c in value):
            return None
        return f"must be {self.what}" + (", or null" if self.nullable else "")


@dataclass(frozen=True)
class Pattern(Rule):
    """A string matching a regular expression, described in words."""

    regex: str
    what: str
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, str) and re.fullmatch(self.regex, value) is not None
        return None if ok else f"must be {self.what}"


@dataclass(frozen=True)
class Flag(Rule):
    nullable: bool = False
    null_means: str = ""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool):
            return None
        return "must be true or false" + (f", or null ({self.null_means})" if self.nullable else "")


@dataclass(frozen=True)
class FlagOr(Rule):
    """true, false, or one of a few names (a mode that says how, where true takes the default)."""

    options: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or (isinstance(value, str) and value in self.options):
            return None
        return "must be true, false or one of " + ", ".join(self.options)


@dataclass(frozen=True)
class Numbers(Rule):
    """A list of numbers, each following `each`, of a length in [min_len, max_len]; `or_one`: a
    single number stands for the whole list."""

    each: Number
    min_len: int = 1
    max_len: int | None = None
    or_one: bool = False
    nullable: bool = False

    def describe(self) -> str:
        n = (f"{self.min_len}" if self.max_len == self.min_len else
             f"{self.min_len} or more" if self.max_len is None else f"{self.min_len} to {self.max_len}")
        text = f"a list of {n} values, each {self.each.describe()}"
        if self.or_one:
            text = f"{self.each.describe()}, or " + text
        return text + (", or null" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        if self.or_one and not isinstance(value, (list, tuple)) and self.each.problem(value) is None:
            return None
        if (not isinstance(value, (list, tuple)) or len(value) < self.min_len
                or (self.max_len is not None and len(value) > self.max_len)
                or any(self.each.problem(v) for v in value)):
            return f"must be {self.describe()}"
        return None


@dataclass(frozen=True)
class Texts(Rule):
    """A list of non-empty strings (tags)."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (list, tuple)) and all(Text().accepts(v) for v in value):
            return None
        return "must be a list of non-empty strings"


@dataclass(frozen=True)
class Mapping(Rule):
    """A mapping of names to values (options passed through to a user's module)."""

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, dict) and all(isinstance(k, str) and k for k in value)
        return None if ok else "must be a mapping of names to values"


POSITIVE_INT = Number(low=1, integer=True)
COUNT = Number(low=0, integer=True)
PROBABILITY = Number(low=0, high=1)
NAME = Text()

# Every field of the training schema (ablate.config.TrainConfig), by its dotted key.
# torch.compile's modes (`trainer.compile=<mode>`; true is "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

RULES: dict[str, Rule] = {
    "preset": NAME,
    # the operator's axes: the ranges here; what combines with what: ablate.space.rules
    "connectivity.kernel_size": POSITIVE_INT,
    "connectivity.shift": Flag(),
    "sharing.channels_per_group": Numbers(POSITIVE_INT, or_one=True, nullable=True),
    "sharing.groups": Number(low=1, integer=True, nullable=True, null_means="channels_per_group decides"),
    "dynamic.kind": NAME,
    "dynamic.reduction": POSITIVE_INT,
    "dynamic.bias": Flag(),
    "dynamic.qkv_bias": Flag(),
    "dynamic.position_bias": Flag(),
    "dynamic.module": Text(nullable=True, what="an importable module name"),
    "dynamic.params": Mapping(),
    # the macro model
    "model.embed_dim": POSITIVE_INT,
    "model.depths": Numbers(POSITIVE_INT, min_len=1, max_len=8),
    "model.patch_size": POSITIVE_INT,
    "model.mlp_ratio": Number(low=0, low_open=True),
    "model.img_size": POSITIVE_INT,
    "model.drop_path_rate": Number(low=0, high=1, high_open=True),
    "model.window": POSITIVE_INT,
    "ops.backend": Choice(("fast", "reference")),
    # data
    "data.name": NAME,
    "data.root": Text(what="a folder path"),
    "data.download": Flag(),
    "data.img_size": POSITIVE_INT,
    "data.in_chans": POSITIVE_INT,
    "data.num_classes": Number(low=2, integer=True),
    "data.val_size": COUNT,
    "data.train_subset": Number(low=1, integer=True, nullable=True, null_means="all of it"),
    "data.test_subset": Number(low=1, integer=True, nullable=True, null_means="all of it"),
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.num_workers": COUNT,
    "data.in_memory": Flag(),
    "data.mean": Numbers(Number(low=0, high=1), min_len=1),
    "data.std": Numbers(Number(low=0, low_open=True), min_len=1),
    "data.crop_padding": COUNT,
    "data.hflip": Flag(),
    "data.auto_augment": Text(nullable=True, what="a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1)"),
    "data.reprob": PROBABILITY,
    "data.interpolation": Choice(("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")),
    "data.crop_pct": Number(low=0, high=1, low_open=True),
    # optimiser, schedule
    "optim.lr": Number(low=0, low_open=True),
    "optim.lr_batch_size": POSITIVE_INT,
    "optim.weight_decay": Number(low=0),
    "optim.betas": Numbers(Number(low=0, high=1, high_open=True), min_len=2, max_len=2),
    "optim.eps": Number(low=0, low_open=True),
    "optim.clip_grad": Number(low=0, low_open=True, nullable=True, null_means="no clipping"),
    "optim.label_smoothing": Number(low=0, high=1, high_open=True),
    "optim.mixup": Number(low=0),
    "optim.cutmix": Number(low=0),
    "optim.mixup_prob": PROBABILITY,
    "optim.mixup_switch_prob": PROBABILITY,
    "optim.ema": Flag(),
    "optim.ema_decay": Number(low=0, high=1, high_open=True),
    "schedule.epochs": POSITIVE_INT,
    "schedule.warmup_epochs": Number(low=0),
    "schedule.warmup_lr": Number(low=0),
    "schedule.min_lr": Number(low=0),
    "schedule.decay": Choice(("cosine", "step", "poly")),
    "schedule.milestones": Numbers(Number(low=0, low_open=True), min_len=1, nullable=True),
    "schedule.decay_rate": Number(low=0, high=1, low_open=True),
    "schedule.power": Number(low=0, low_open=True),
    # where and how it runs
    # the devices `distributed.checked_device` runs (an Apple GPU's mps is not one: nothing tests it)
    "trainer.device": Pattern(r"auto|cpu|cuda(:\d+)?",
                              "auto, cpu, cuda or cuda:<index> (auto: $ABLATE_DEVICE where it is set, "
                              "else cuda where there is one)"),
    "trainer.precision": Choice(("auto", "bf16", "fp32")),
    "trainer.channels_last": Flag(nullable=True, null_means="on a GPU"),
    "trainer.compile": FlagOr(COMPILE_MODES),
    "trainer.threads": Number(low=1, integer=True, nullable=True, null_means="torch's default"),
    "trainer.seed": COUNT,
    "trainer.resume": Choice(("auto", "never")),
    "trainer.results_root": Text(what="a folder path"),
    "trainer.sweep": Text(nullable=True, what="a folder name"),
    "trainer.run_name": Text(nullable=True, what="a folder name"),
    "trainer.quiet": Flag(),
    "trainer.test_every_epoch": Flag(),
    "trainer.rerun_other_code": Flag(),
    "trainer.inference_batches": COUNT,
    "trainer.distributed": Flag(),
    "trainer.backend": Choice(("auto", "nccl", "gloo")),
    "trainer.sync_bn": Flag(),
    "trainer.dist_timeout_min": Number(low=0, low_open=True),
    "logger.name": Choice(("wandb", "none")),
    "logger.mode": Choice(("auto", "online", "offline", "disabled"), nullable=True),
    "logger.project": NAME,
    "logger.entity": Text(nullable=True),
    "logger.tags": Texts(),
    "logger.init_timeout": Number(low=0, low_open=True),
    # the downstream tasks (ablate.config.DownstreamConfig)
    "task.name": Choice(("detection", "segmentation")),
    "task.pretrained": Flag(),
    "head": Mapping(),
    "pretrain.sweep": Text(what="a folder name"),
    "pretrain.overrides": Texts(),
}

# `python -m ablate.measure`: the model side plus what it measures at.
MEASURE_RULES: dict[str, Rule] = {
    **{k: v for k, v in RULES.items() if k.split(".")[0] in
       ("preset", "connectivity", "sharing", "dynamic", "block", "model", "ops")},
    "img_size": POSITIVE_INT, "in_chans": POSITIVE_INT, "num_classes": POSITIVE_INT,
}


def schema_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every leaf of a dataclass schema."""
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        kind = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            yield from schema_fields(type(kind), key + ".")
        else:
            yield key, f


def _enum_type(schema: type, key: str) -> type[enum.Enum] | None:
    """The Enum a field of `schema` (dotted key below it) is typed by, from its annotation."""
    owner, *path = [schema, *key.split(".")]
    for name in path[:-1]:
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        owner = type(field.default_factory())
    hint = typing.get_type_hints(owner).get(path[-1])
    return hint if isinstance(hint, type) and issubclass(hint, enum.Enum) else None


def _rules_for(schema: type, rules: dict[str, Rule], prefix: str = "") -> dict[str, Rule]:
    out = {}
    for key, _ in schema_fields(schema, prefix):
        kind = _enum_type(schema, key[len(prefix):])
        rule = rules.get(key) or (Enumerated(kind) if kind is not None else None)
        if rule is None:
            raise LookupError(f"the schema field {key} has no rule in ablate/schema.py: add one to RULES")
        out[key[len(prefix):]] = rule
    return out


def _raw(cfg: DictConfig, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return str(OmegaConf.to_container(node, resolve=False).get(leaf))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, str):
        return repr(value)
    return "null" if value is None else str(value)


def config_problems(cfg: DictConfig, schema: type, rules: dict[str, Rule], prefix: str = "") -> list[str]:
    """One line per field of `cfg` outside its rule: the key (after `prefix`), the value, what it must be."""
    problems = []
    for key, rule in _rules_for(schema, rules, prefix).items():
        try:
            value = _plain(OmegaConf.select(cfg, key, throw_on_missing=True))
        except MissingMandatoryValue:
            problems.append(f"{prefix}{key} is not set: set {prefix}{key}=<value>")
            continue
        except InterpolationResolutionError:
            if "${hydra:" in _raw(cfg, key):  # the launcher's value (a sweep plans outside the job):
                continue                       # checked again in the job, where it resolves
            raise
        if value is None and rule.nullable:
            continue
        problem = rule.problem(value)
        if problem:
            problems.append(f"{prefix}{key}={_shown(value)} {problem}")
    return problems


def validate_config(cfg: DictConfig, schema: type, rules: dict[str, Rule] | None = None,
                    prefix: str = "") -> None:
    """Raise ConfigError naming every field of `cfg` outside its range; `schema` is the dataclass
    `cfg` follows (ablate.config.TrainConfig for a training config). `prefix`: `cfg` is the part of
    the config under it (e.g. "data." for a DataConf)."""
    problems = config_problems(cfg, schema, RULES if rules is None else rules, prefix)
    if problems:
        raise ConfigError(_joined(problems))


def _joined(problems: Sequence[str]) -> str:
    if len(problems) == 1:
        return problems[0] + "."
    return f"{len(problems)} settings are out of range: " + "; ".join(problems) + "."
