"""What a run is: its identity, its experiment, and the settings that tell two experiments apart.

A run's **identity** is every resolved setting that can change what it computes (the operator's axes,
block, model, data, optimizer, schedule) plus its seed. Where it runs and how it is shown (`trainer`,
`logger`, `ops`: the fast kernels agree with the reference) and where its data files lie are not part
of it: the same experiment run on a cluster with its data elsewhere is still the same experiment.
One trainer setting does change the numbers: the precision a run asks for. An explicit
`trainer.precision=bf16` (or `fp32`) is recorded as `precision`; `auto` (the device's default: fp32 on
a CPU, bf16 autocast on a GPU) adds nothing, so every default run keeps the identity it always had.

A setting added to the config after runs were recorded is left out of the identity at the value that
computes what every earlier run computed (LATER_DEFAULTS: the learning-rate decay's settings at
cosine), so that earlier runs keep their identity, and their run folders and experiments, as
`precision` at auto does.

An **experiment** is an identity without the seed: the runs of one experiment differ only in their
seed, so they, and only they, are averaged, and their spread is seed-to-seed noise. The experiment
key (a hash) is written into every results.json; the analysis groups by it.

Everything here works on plain nested dicts (a resolved config, a results.json record, a W&B run's
config), so the trainer, the sweeper and the analysis share one definition.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ablate.errors import BadInput

__all__ = ["NOT_IDENTITY", "EXECUTION_ONLY", "AXIS_SETTINGS", "identity_from_config", "experiment_of",
           "effective_precision", "experiment_key", "flatten", "differing_keys", "describe_difference",
           "axis_of_setting", "IdentityConflict", "folder_conflict", "LABEL_SETTINGS", "LATER_DEFAULTS",
           "FLIPS", "matches_setting"]

# Top-level config groups that say where a run executes and how it is shown, never what it computes.
NOT_IDENTITY = ("trainer", "logger", "ops")
# Settings inside the identity's groups that only say how data reach the model (same numbers either way).
EXECUTION_ONLY = ("data.root", "data.download", "data.num_workers", "data.in_memory", "data.eval_batch_size")
# Settings added after runs were recorded, at the value every earlier run had in effect (the schedule
# was cosine): left out of the identity at that value. A row's missing setting reads as this value.
LATER_DEFAULTS: dict[str, Any] = {
    "schedule.decay": "cosine",
    "schedule.milestones": None,
    "schedule.decay_rate": 0.1,
    "schedule.power": 1.0,
}
# The paper's axes as settings of the identity (flattened keys, by prefix): a pair of experiments
# differs "in one axis" when every setting that differs belongs to the same entry here.
AXIS_SETTINGS: dict[str, tuple[str, ...]] = {
    "connectivity": ("connectivity.",),
    "spatial": ("sharing.spatial",),
    "channels": ("sharing.channels_per_group", "sharing.groups"),
    "dynamic": ("dynamic.",),
}
# A preset is a name for a point of the axes (and a block), not a setting of its own.
LABEL_SETTINGS = ("preset",)
# What the effect table flips one at a time: the paper's axes, and the numeric precision (the same
# experiment in bf16 against fp32: what bf16 costs in accuracy).
FLIPS: dict[str, tuple[str, ...]] = {**AXIS_SETTINGS, "precision": ("precision",)}


class IdentityConflict(BadInput, ValueError):
    """A run folder holds another experiment than the command asks for: nothing may touch it."""


def folder_conflict(folder: Any, source: str, theirs: Mapping[str, Any],
                    ours: Mapping[str, Any]) -> IdentityConflict:
    """The error for a run folder whose `source` file records the identity `theirs`, not `ours`."""
    return IdentityConflict(
        f"the run folder {folder} holds another run (its {source}: {describe_difference(theirs, ours)}). "
        "Give this run another trainer.run_name (or trainer.sweep), or delete that folder to replace "
        "the run it holds.")


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def _get(tree: Mapping[str, Any], dotted: str, missing: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return missing
        tree = tree[part]
    return tree


def effective_precision(device_type: str, precision: str) -> str:
    """What a run computes in: trainer.precision, `auto` resolved by the device type (bf16 autocast on
    a GPU, fp32 elsewhere). `auto` is not part of the identity (a sweep plans a job before it knows its
    device), so the record says what it became (`precision_used`), and the analysis keeps bf16 and
    fp32 runs apart by it: one rule for the trainer and the analysis."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def identity_from_config(experiment: Mapping[str, Any], seed: Any, precision: Any = None) -> dict[str, Any]:
    """The identity of a run from its resolved config (a plain nested dict; groups of NOT_IDENTITY are
    dropped if present), its seed and its requested precision (default: the config's
    trainer.precision, where it has one)."""
    if precision is None:
        trainer = experiment.get("trainer")
        precision = trainer.get("precision") if isinstance(trainer, Mapping) else None
    identity = json.loads(json.dumps({k: v for k, v in experiment.items() if k not in NOT_IDENTITY},
                                     default=str))
    for dotted in EXECUTION_ONLY:
        _drop(identity, dotted)
    for dotted, default in LATER_DEFAULTS.items():
        if _get(identity, dotted, default) == default:
            _drop(identity, dotted)
    if precision not in (None, "auto"):
        identity["precision"] = str(precision)
    identity["seed"] = seed
    return identity


def experiment_of(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity without its seed: what every seed of one experiment shares."""
    return {k: v for k, v in identity.items() if k != "seed"}


def experiment_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash of the experiment (the identity without the seed)."""
    text = json.dumps(experiment_of(identity), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists become tuples (hashable, comparable)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}.") if value else {name: "{}"})
        else:
            flat[name] = _hashable(value)
    return flat


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The flattened settings in which two identities (or experiments) differ, sorted."""
    fa, fb = flatten(a), flatten(b)
    missing = object()
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, missing) != fb.get(k, missing))


def _shown(flat: Mapping[str, Any], key: str) -> str:
    if key not in flat:
        return f"{_text(LATER_DEFAULTS[key])} (default)" if key in LATER_DEFAULTS else "(unset)"
    return _text(flat[key])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def describe_difference(theirs: Mapping[str, Any], ours: Mapping[str, Any], theirs_as: str = "recorded",
                        limit: int = 6) -> str:
    """What tells two identities apart, for a message: the operator first when the presets differ
    ("operator: dwconv recorded, local_attention here"), then up to `limit` differing settings with
    both values ("and N more")."""
    parts = []
    if theirs.get("preset") != ours.get("preset"):
        parts.append(f"operator: {theirs.get('preset')} {theirs_as}, {ours.get('preset')} here")
    keys = [k for k in differing_keys(theirs, ours) if k not in LABEL_SETTINGS]
    flat_theirs, flat_ours = flatten(theirs), flatten(ours)
    parts += [f"{k}: {_shown(flat_theirs, k)} {theirs_as}, {_shown(flat_ours, k)} here" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


def matches_setting(key: str, prefixes: Sequence[str]) -> bool:
    """Whether a flattened setting is one of `prefixes`: a key itself ("preset"), or a group ending
    in "." ("dynamic." holds "dynamic.reduction")."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def axis_of_setting(key: str, axes: Mapping[str, tuple[str, ...]] = AXIS_SETTINGS) -> str | None:
    """The axis a flattened setting belongs to ("dynamic.reduction" -> "dynamic"), or None."""
    for axis, prefixes in axes.items():
        if matches_setting(key, prefixes):
            return axis
    return None
