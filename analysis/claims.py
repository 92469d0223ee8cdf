"""The paper's claims as a table with verdicts: supported, contradicted or unresolved by the local runs.

The claims live in one readable file, `analysis/claims.yaml` (what each claims, the two sides, the
expected direction or tolerance, where the paper shows it); this module reads it, finds in a results
store the pairs of experiments each claim compares, and judges the paired differences.

Like with like: the two sides of a claim pair only within one **context**, the settings outside the
operator (model, data, recipe, budget, precision, ...) all equal, and then seed by seed. A side is a
preset exactly as its config file defines it (composed by Hydra, so a change to the preset's file is
followed), with the side's own settings changed; a run of that preset with any other operator setting
(another kernel size, say) is another operator and does not stand for the side. Every claim gets a
row per context in the store, and a row saying "not in this store" where no context has both sides.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ablate.errors import BadInput
from ablate.tracking.identity import matches_setting
from analysis.axes import is_missing
from analysis.comparison import ACCURACY
from analysis.experiments import distinguishing_settings, experiments, seed_pairs
from analysis.stats import Interval, paired_difference, seeds_to_bound, seeds_to_resolve
from analysis.tables import (
    format_table,
    interval_cell,
    number_cell,
    pairs_cell,
    printed_cells,
    seeds_needed_cell,
    text_cell,
    write_table,
)

__all__ = ["CLAIMS_FILE", "Claim", "ClaimsFileError", "load_claims", "claims_table", "printed_claims",
           "write_claims", "CLAIMS_PRINTED", "OPERATOR_SETTINGS", "EXPECTATIONS", "side_settings",
           "split_settings"]

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
# The settings that make up an operator (flattened identity keys, by prefix): what the two sides of a
# claim may differ in. Everything else is the context and must be equal.
OPERATOR_SETTINGS = ("preset", "block.", "connectivity.", "sharing.", "dynamic.")
EXPECTATIONS = ("better", "worse", "on_par")
NOT_IN_STORE = "not in this store"
# delta_top1_*: the difference of the claim's metric (top-1 for the paper's ImageNet claims, box AP,
# mask AP or mIoU for its detection and segmentation ones), named as the effect table names it
CLAIM_COLUMNS = ("id", "claim", "metric", "expect", "tolerance", "from", "to", "settings", "task", "model",
                 "data", "epochs", "train_size", "pairs", "unpaired", "delta_top1_mean", "delta_top1_std",
                 "ci_low", "ci_high", "verdict", "seeds_needed", "where")
# what a claim may compare: final_test_<metric> of the runs
METRICS = ("top1", "top5", "box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75", "miou",
           "pixel_acc")
# settings that follow from a side's operator and other settings, never part of a context: a downstream
# run's pretraining (its operator's classification run, or scratch)
DERIVED = ("pretrained_from",)
CONTEXT_SHOWN = ("task", "model", "data", "epochs", "train_size")


class ClaimsFileError(BadInput, ValueError):
    """The claims file cannot be read as claims: names the file, the claim and the key."""


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    where: str
    sides: tuple[dict[str, Any], dict[str, Any]]  # from, to: {"operator": preset, flat key: value}
    expect: str
    tolerance: float | None = None
    labels: tuple[str, str] = ("", "")  # how the two sides print
    metric: str = "top1"  # the runs' final_test_<metric> is compared


def _side_label(side: Mapping[str, Any]) -> str:
    extra = ", ".join(f"{k}={_canonical(v) if isinstance(v, bool) else v}" for k, v in side.items()
                      if k != "operator")
    return side["operator"] + (f" ({extra})" if extra else "")


def load_claims(path: str | Path = CLAIMS_FILE) -> list[Claim]:
    """The claims of `path`, checked: every claim has an id, a sentence, two sides naming a known
    preset, an expectation of EXPECTATIONS and, for on_par, a positive tolerance."""
    from ablate.space.presets import PRESETS

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ClaimsFileError(f"cannot read the claims file {path}: {err}") from err
    entries = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ClaimsFileError(f"{path}: expected a top-level `claims:` list")
    claims, seen = [], set()
    for i, entry in enumerate(entries):
        name = entry.get("id", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"

        def bad(what: str) -> ClaimsFileError:
            return ClaimsFileError(f"{path}, claim {name}: {what}")  # noqa: B023

        if not isinstance(entry, dict):
            raise bad("a claim is a mapping with id, claim, from, to, expect")
        for key in ("id", "claim", "from", "to", "expect"):
            if key not in entry:
                raise bad(f"missing key `{key}`")
        unknown = set(entry) - {"id", "claim", "where", "from", "to", "expect", "tolerance", "metric"}
        if unknown:
            raise bad(f"unknown key(s) {', '.join(sorted(unknown))}; a claim has id, claim, where, from, to, "
                      "expect, tolerance, metric")
        metric = entry.get("metric", "top1")
        if metric not in METRICS:
            raise bad(f"`metric` must be one of {', '.join(METRICS)}; got {metric!r}")
        if entry["id"] in seen:
            raise bad("the id is used twice")
        seen.add(entry["id"])
        sides = []
        for key in ("from", "to"):
            side = entry[key]
            if not isinstance(side, dict) or side.get("operator") not in PRESETS:
                raise bad(f"`{key}` must name a preset as `operator:` (one of {', '.join(PRESETS)}); "
                          f"got {side!r}")
            sides.append(dict(side))
        if entry["expect"] not in EXPECTATIONS:
            raise bad(f"`expect` must be one of {', '.join(EXPECTATIONS)}; got {entry['expect']!r}")
        tolerance = entry.get("tolerance")
        if entry["expect"] == "on_par":
            if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
                raise bad(f"an on_par claim needs `tolerance:` > 0 (points of its metric); got {tolerance!r}")
            tolerance = float(tolerance)
        claims.append(Claim(str(entry["id"]), str(entry["claim"]), str(entry.get("where", "")),
                            (sides[0], sides[1]), entry["expect"], tolerance,
                            (_side_label(sides[0]), _side_label(sides[1])), metric))
    return claims


def _is_operator_setting(key: str) -> bool:
    return matches_setting(key, OPERATOR_SETTINGS)


def _canonical(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True, default=str)


@cache
def _preset_settings(preset: str) -> tuple[tuple[str, str], ...]:
    """The operator settings of `preset` as its config file composes them (flat key, canonical value)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ablate.config import CONF_DIR
    from ablate.runs import run_identity
    from ablate.tracking.identity import experiment_of, flatten

    overrides = [f"operator={preset}"]
    if GlobalHydra.instance().is_initialized():
        cfg = compose("train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    flat = flatten(experiment_of(run_identity(cfg)))
    return tuple(sorted((k, _canonical(v)) for k, v in flat.items() if _is_operator_setting(k)))


def side_settings(side: Mapping[str, Any], window: Any = None) -> dict[str, str]:
    """The operator settings a run must have to stand for `side` (canonical values), in a context
    whose model has `window` (`model.window`, which a preset's kernel size follows unless the side
    sets its own)."""
    wanted = dict(_preset_settings(side["operator"]))
    if window is not None and "connectivity.kernel_size" in wanted:
        wanted["connectivity.kernel_size"] = _canonical(window)
    for key, value in side.items():
        if key != "operator":
            wanted[key] = _canonical(value)
    return wanted


def split_settings(settings: Mapping[str, Any], free: Sequence[str] = (),
                   compared: Sequence[str] = ()) -> tuple[dict[str, str], str]:
    """An experiment's (side settings, context key): the side settings are the operator's and the
    `compared` ones (a claim's sides may set other settings, e.g. task.pretrained); the `free`
    settings (a tuned one, chosen per operator) and the DERIVED ones are in neither."""
    kept = {k: _canonical(v) for k, v in settings.items() if k not in free and k not in DERIVED}
    sided = {k: v for k, v in kept.items() if _is_operator_setting(k) or k in compared}
    context = json.dumps({k: v for k, v in kept.items() if k not in sided}, sort_keys=True)
    return sided, context


def _verdict(claim: Claim, interval: Interval) -> str:
    """supported / contradicted / unresolved from the interval of Δ (claims.yaml states the rules).
    Differences without spread (tied pairs) give an interval of no width, which settles nothing."""
    low, high = interval.low, interval.high
    if math.isnan(low) or math.isnan(high) or not interval.std > 0:
        return "unresolved"
    if claim.expect == "on_par":
        supported = -claim.tolerance <= low and high <= claim.tolerance
        contradicted = low > claim.tolerance or high < -claim.tolerance
    elif claim.expect == "better":
        supported, contradicted = low > 0, high < 0
    else:
        supported, contradicted = high < 0, low > 0
    return "supported" if supported else "contradicted" if contradicted else "unresolved"


def _seeds_needed(claim: Claim, mean: float, std: float) -> float:
    """Paired seeds that settle an unresolved claim 4 times in 5 at this mean and spread."""
    if claim.expect == "on_par":
        return seeds_to_bound(mean, std, claim.tolerance)
    return seeds_to_resolve(mean, std)


def claims_table(runs: pd.DataFrame, claims: Sequence[Claim] | None = None, metric: str = ACCURACY,
                 free: Sequence[str] = ()) -> pd.DataFrame:
    """One row per claim and context holding both of its sides (else one row "not in this store"):
    Δ = to - from of the claim's metric over the paired seeds (mean, std, 95% t-interval), the
    verdict, and for an unresolved claim the paired seeds that would settle it 4 times in 5. `free`
    settings may differ between the sides (a tuned sweep: each operator at its chosen learning rate).
    `metric`: a column to compare for every claim instead of each claim's own."""
    claims = load_claims() if claims is None else claims
    groups = experiments(runs)
    rows, settings = [], []
    for claim in claims:
        column = f"final_test_{claim.metric}" if metric == ACCURACY else metric
        if column not in runs or runs[column].isna().all():  # no run of the claim's task: not its store
            continue
        compared = sorted({k for side in claim.sides for k in side
                           if k != "operator" and not _is_operator_setting(k)})
        by_context: dict[str, list[tuple[dict[str, str], pd.DataFrame]]] = {}
        for _, group in groups:
            if column not in group or group[column].isna().all():  # runs of another task
                continue
            sided, context = split_settings(group.iloc[0]["settings"], free, compared)
            by_context.setdefault(context, []).append((sided, group))
        base = {"id": claim.id, "claim": claim.claim, "metric": claim.metric, "expect": claim.expect,
                "tolerance": claim.tolerance, "from": claim.labels[0], "to": claim.labels[1],
                "where": claim.where, "settings": ""}
        found = False
        for context, members in by_context.items():
            window = json.loads(context).get("model.window")  # canonical (JSON) like every value here
            window = None if window is None else json.loads(window)
            wanted = [side_settings(side, window) for side in claim.sides]
            sides = [next((g for op, g in members if op == w), None) for w in wanted]
            if sides[0] is None or sides[1] is None:
                continue
            # both sides are here: a row even with no seed in common (0 pairs, the seeds counted as
            # unpaired), never "not in this store"
            paired, src, dst, unpaired = seed_pairs(sides[0], sides[1], column)
            found = True
            deltas = (dst[column] - src[column]).to_numpy(dtype=float)
            interval = paired_difference(deltas).interval
            verdict = _verdict(claim, interval)
            first = sides[0].iloc[0]
            rows.append({**base, **{c: first[c] for c in CONTEXT_SHOWN}, "pairs": len(paired),
                         "unpaired": unpaired, "delta_top1_mean": interval.mean,
                         "delta_top1_std": interval.std,
                         "ci_low": interval.low, "ci_high": interval.high, "verdict": verdict,
                         "seeds_needed": _seeds_needed(claim, interval.mean, interval.std)
                         if verdict == "unresolved" and len(paired) >= 2 else math.nan})
            settings.append({k: v for k, v in first["settings"].items()
                             if not _is_operator_setting(k) and k not in free and k not in compared
                             and k not in DERIVED})
        if not found:
            rows.append({**base, **{c: math.nan for c in CONTEXT_SHOWN}, "pairs": 0, "unpaired": 0,
                         "verdict": NOT_IN_STORE,
                         **{c: math.nan for c in ("delta_top1_mean", "delta_top1_std", "ci_low", "ci_high",
                                                  "seeds_needed")}})
            settings.append(None)
    table = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    measured = [i for i, s in enumerate(settings) if s is not None]
    if measured:
        shown = distinguishing_settings([settings[i] for i in measured],
                                        {c: [table[c].iloc[i] for i in measured] for c in CONTEXT_SHOWN})
        for i, text in zip(measured, shown):
            table.loc[i, "settings"] = text
    return table


_METRIC_NAMES = {"top1": "top-1", "top5": "top-5", "box_ap": "box AP", "box_ap50": "box AP50",
                 "box_ap75": "box AP75", "mask_ap": "mask AP", "mask_ap50": "mask AP50",
                 "mask_ap75": "mask AP75", "miou": "mIoU", "pixel_acc": "pixel acc."}


def _expect_text(row) -> str:
    return f"on par (±{row['tolerance']:g})" if row["expect"] == "on_par" else str(row["expect"])


# printed header -> the numbers it shows (analysis.check reads them back with the same cells)
CLAIMS_PRINTED = {
    "paired seeds": pairs_cell(),
    "Δ (points)": number_cell("delta_top1_mean", "+.2f"),
    "95% CI": interval_cell("ci_low", "ci_high", "pairs", "+.2f"),
    "verdict": text_cell("verdict"),
    "seeds to settle": seeds_needed_cell(),
}


def printed_claims(table: pd.DataFrame) -> pd.DataFrame:
    """The claims table as read in Markdown (a settings column only where contexts differ in one)."""
    columns = {"claim": lambda r: r["claim"], "metric": lambda r: _METRIC_NAMES.get(r["metric"], r["metric"]),
               "expect": _expect_text, "from": lambda r: r["from"], "to": lambda r: r["to"]}
    if len(table) and (table["settings"].fillna("") != "").any():
        columns["settings"] = lambda r: r["settings"]
    def context(column, whole=False):  # empty for a claim without runs (no context to show)
        return lambda r: "" if is_missing(r[column]) else f"{int(r[column])}" if whole else str(r[column])

    # a task column only where a claim is judged on detection or segmentation (an all-missing column
    # is float, hence the cast before filling)
    if len(table) and (table["task"].astype(object).fillna("classification") != "classification").any():
        columns["task"] = context("task")
    columns.update({"model": context("model"), "data": context("data"), "epochs": context("epochs", True),
                    "train images": context("train_size", True)})
    columns.update(printed_cells(CLAIMS_PRINTED))
    columns["paper"] = lambda r: r["where"]
    return format_table(table, columns)


def write_claims(runs: pd.DataFrame, out_dir: Path, claims: Sequence[Claim] | None = None,
                 free: Sequence[str] = ()) -> list[Path]:
    """claims.csv (full precision) and claims.md in `out_dir`."""
    table = claims_table(runs, claims, free=free)
    return write_table(table, printed_claims(table), Path(out_dir) / "claims", formats=("csv", "md"))
