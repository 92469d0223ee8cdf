"""Every validity rule of the operator space, in one function.

`validate` is the only place that decides whether a point of the space is valid. Its error names the
rule that failed and the nearest valid settings, as Hydra overrides a user can paste. A sweep records
an invalid cell as skipped with this message; nothing else in the code re-checks these rules.
"""
from __future__ import annotations

import importlib
import importlib.util
import traceback
from collections.abc import Sequence

from ablate.errors import BadInput
from ablate.space.options import dynamic_option, dynamic_options
from ablate.space.spec import CONNECTIVITY_KINDS, SPATIAL_SHARING, OperatorSpec

__all__ = ["InvalidOperatorError", "validate", "validate_window", "stage_channels_per_group"]


class InvalidOperatorError(BadInput, ValueError):
    """An invalid point of the operator space: which rule, and what to change."""

    def __init__(self, rule: str, message: str, nearest: Sequence[str] = ()):
        self.rule, self.message, self.nearest = rule, message, tuple(nearest)
        text = f"invalid operator [{rule}]: {message}"
        if self.nearest:
            text += " Nearest valid settings: " + "; ".join(self.nearest)
        super().__init__(text)


def _where(err: Exception, module: str) -> str:
    """File and line of an error raised importing `module`: its own last line on the way there."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}, line {err.lineno}"
    try:
        origin = importlib.util.find_spec(module).origin
    except Exception:  # noqa: BLE001  (a package that fails too: fall back to the last frame)
        origin = None
    frames = traceback.extract_tb(err.__traceback__)
    frame = ([f for f in frames if f.filename == origin] or frames or [None])[-1]
    return f"{frame.filename}, line {frame.lineno}" if frame else module


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_common_divisors(value: int, widths: Sequence[int], k: int = 2) -> list[int]:
    common = [d for d in _divisors(min(widths)) if all(w % d == 0 for w in widths)]
    return sorted(sorted(common, key=lambda d: (abs(d - value), d))[:k])


def stage_channels_per_group(spec: OperatorSpec, widths: Sequence[int]) -> list[int]:
    """Channels per weight group in each stage. Call `validate` first for a clear error."""
    if spec.sharing.groups is not None:
        return [w // spec.sharing.groups for w in widths]
    cpg = spec.sharing.channels_per_group
    return list(cpg) if isinstance(cpg, tuple) else [cpg] * len(widths)


def validate_window(spec: OperatorSpec, window: int) -> None:
    """The operator against its model's window (`model.window`, what every connectivity's kernel_size
    defaults to). Global connectivity sees every position, so the kernel_size it carries is unused:
    another value than the window would change nothing the model computes, yet make another
    experiment of the same model (a grid over kernel sizes would train it once per size)."""
    k = spec.connectivity.kernel_size
    if spec.connectivity.kind == "global" and k != window:
        raise InvalidOperatorError(
            "global connectivity has no kernel size",
            f"every position sees every position, so connectivity.kernel_size={k} would change nothing; "
            f"it stays the model's window ({window}).",
            [f"connectivity.kernel_size={window}", "connectivity=window", "connectivity=sliding"])


def validate(
    spec: OperatorSpec,
    widths: Sequence[int],
    resolutions: Sequence[tuple[int, int]] | None = None,
    whole_model: bool = False,
) -> list[int]:
    """Check `spec` for stages of the given channel widths (and feature-map sizes, when fixed).

    `whole_model`: the stages are all of a model's, so a window or kernel that sees every one of
    their maps whole (global connectivity under another name) is refused; a single stage's map may be
    smaller than the window (Swin's last stage: the window shrinks to the map).
    Returns the channels per weight group of each stage. Raises InvalidOperatorError otherwise.
    """
    conn, shar, dyn = spec.connectivity, spec.sharing, spec.dynamic

    # -- the option names themselves --------------------------------------------------------------
    if conn.kind not in CONNECTIVITY_KINDS:
        raise InvalidOperatorError(
            "connectivity.kind", f"unknown connectivity {conn.kind!r}.",
            [f"connectivity={k}" for k in CONNECTIVITY_KINDS])
    if shar.spatial not in SPATIAL_SHARING:
        raise InvalidOperatorError(
            "sharing.spatial", f"unknown spatial sharing {shar.spatial!r}.",
            [f"sharing.spatial={k}" for k in SPATIAL_SHARING])
    if dyn.module:
        try:
            importlib.import_module(dyn.module)
        except ImportError as err:
            raise InvalidOperatorError(
                "dynamic.module", f"cannot import {dyn.module!r}, which should register "
                f"dynamic option {dyn.kind!r} ({err}).",
                ["put the module on PYTHONPATH", "dynamic.module=null"]) from err
        except Exception as err:  # noqa: BLE001  (the user's module is input: any error in it is theirs)
            raise InvalidOperatorError(
                "dynamic.module", f"importing {dyn.module!r}, which should register dynamic option "
                f"{dyn.kind!r}, failed at {_where(err, dyn.module)}: {type(err).__name__}: {err}.",
                [f"fix {dyn.module}", "dynamic.module=null"]) from err
    option = dynamic_option(dyn.kind)
    if option is None:
        raise InvalidOperatorError(
            "dynamic.kind", f"unknown dynamic option {dyn.kind!r}; registered: {list(dynamic_options())}.",
            [f"dynamic={k}" for k in dynamic_options()])

    # -- connectivity parameters ------------------------------------------------------------------
    k = conn.kernel_size
    if conn.kind != "global":
        if not isinstance(k, int) or k < 1:
            raise InvalidOperatorError(
                "connectivity.kernel_size", f"kernel_size must be a positive integer, got {k!r}.",
                ["connectivity.kernel_size=7"])
        if conn.kind == "sliding" and k % 2 == 0:
            raise InvalidOperatorError(
                "sliding needs an odd kernel_size",
                f"a sliding neighbourhood is centred on its position, so kernel_size={k} has no centre.",
                [f"connectivity.kernel_size={k - 1}", f"connectivity.kernel_size={k + 1}",
                 "connectivity=window"])
    if whole_model and resolutions and conn.kind != "global" and isinstance(k, int):
        first = max(resolutions, key=max)
        largest = max(first)
        # a window sees a whole map when it covers it; a sliding neighbourhood when it reaches k // 2
        # positions each way, so a corner reaches the far side: then every map is seen whole
        if conn.kind == "sliding":
            whole, sizes = k // 2 >= largest - 1, list(range(2 * largest - 3, 0, -2))[:2]
            reach = f"reaches {k // 2} positions each way, so every position sees"
        else:
            whole, sizes = k >= largest, list(range(largest - 1, 0, -1))[:2]
            reach = "covers"
        if whole:
            raise InvalidOperatorError(
                "kernel_size spans every map",
                f"kernel_size={k} {reach} the whole of the largest feature map ({first[0]}x{first[1]}) "
                "and of every smaller one, which is global connectivity.",
                [f"connectivity.kernel_size={v} (or model.window={v})" for v in sizes]
                + ["connectivity=global"])
    if conn.shift and conn.kind != "window":
        raise InvalidOperatorError(
            "shift needs window connectivity",
            f"only non-overlapping windows are shifted; {conn.kind} connectivity has none to shift.",
            ["connectivity.shift=false", "connectivity=window"])

    # -- spatial sharing against connectivity and dynamic -----------------------------------------
    if shar.spatial == "window" and conn.kind == "sliding":
        raise InvalidOperatorError(
            "spatial: window needs window or global connectivity",
            "weights shared across windows need windows; a sliding neighbourhood has none.",
            ["sharing.spatial=offset", "sharing.spatial=none", "connectivity=window"])
    if shar.spatial not in option.spatial:
        why = f" ({option.why})" if option.why else ""
        raise InvalidOperatorError(
            f"{dyn.kind} needs spatial: {' or '.join(option.spatial)}",
            f"dynamic={dyn.kind} cannot have spatial sharing {shar.spatial!r}{why}.",
            [f"sharing.spatial={s}" for s in option.spatial]
            + [f"dynamic={d}" for d in dynamic_options()
               if d != dyn.kind and shar.spatial in dynamic_option(d).spatial][:2])
    if conn.kind not in option.connectivity:
        raise InvalidOperatorError(
            f"{dyn.kind} needs connectivity: {' or '.join(option.connectivity)}",
            f"dynamic option {dyn.kind!r} is defined for {', '.join(option.connectivity)} connectivity, "
            f"not {conn.kind}.",
            [f"connectivity={c}" for c in option.connectivity])
    if dyn.kind in ("homogeneous", "inhomogeneous") and (not isinstance(dyn.reduction, int)
                                                         or dyn.reduction < 1
                                                         or min(widths) // dyn.reduction < 1):
        raise InvalidOperatorError(
            "dynamic.reduction", f"the weight predictor's hidden width is channels // reduction; "
            f"reduction={dyn.reduction!r} leaves none at width {min(widths)}.",
            # DWNet's 4 where the narrowest stage has 4 channels, and the largest that leaves one
            [f"dynamic.reduction={r}" for r in sorted({min(4, min(widths)), min(widths)})])

    # -- fixed input size -------------------------------------------------------------------------
    position_tables = (
        (dyn.kind == "static" and shar.spatial == "none")
        or (conn.kind == "global" and (shar.spatial in ("offset", "window")
                                       or (dyn.kind == "attention" and dyn.position_bias)))
    )
    if position_tables and resolutions is None:
        nearest = ["build it with img_size set"]
        nearest += (["connectivity=window", "connectivity=sliding"] if conn.kind == "global"
                    else ["sharing.spatial=offset"])
        raise InvalidOperatorError(
            "needs a fixed input size",
            f"{conn.kind} connectivity with spatial={shar.spatial}, dynamic={dyn.kind} has weights "
            "per position of the map, so the map size must be known when the model is built.",
            nearest)

    # -- channel sharing --------------------------------------------------------------------------
    cpg, groups = shar.channels_per_group, shar.groups
    if (cpg is None) == (groups is None):
        raise InvalidOperatorError(
            "one channel-sharing knob",
            f"set exactly one of channels_per_group ({cpg!r}) and groups ({groups!r}).",
            ["sharing.groups=null", "sharing.channels_per_group=null"] if cpg is not None
            else [f"sharing.channels_per_group={_nearest_common_divisors(1, widths, 1)[0]}",
                  "sharing.groups=1"])
    if groups is not None:
        if not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
            near = _nearest_common_divisors(groups if isinstance(groups, int) else 1, widths)
            raise InvalidOperatorError(
                "groups must divide every stage width",
                f"groups={groups!r} does not divide the stage widths {list(widths)}.",
                [f"sharing.groups={g}" for g in near])
    else:
        per_stage = list(cpg) if isinstance(cpg, tuple) else [cpg] * len(widths)
        if len(per_stage) != len(widths):
            raise InvalidOperatorError(
                "channels_per_group: one number or one per stage",
                f"got {len(per_stage)} numbers for {len(widths)} stages.",
                [f"sharing.channels_per_group={per_stage[0]}"])
        for stage, (c, w) in enumerate(zip(per_stage, widths)):
            if not isinstance(c, int) or c < 1 or w % c:
                target = c if isinstance(c, int) else 1
                # one number for every stage must divide them all; a per-stage list only this one
                near = (_nearest_common_divisors(target, widths) if not isinstance(cpg, tuple)
                        else sorted(sorted(_divisors(w), key=lambda d: (abs(d - target), d))[:2]))
                raise InvalidOperatorError(
                    "channels_per_group must divide every stage width",
                    f"channels_per_group={c!r} does not divide the width {w} of stage {stage} "
                    f"(widths {list(widths)}).",
                    [f"sharing.channels_per_group={d}" for d in near]
                    + [f"sharing.groups={w // near[0]}"])
    return stage_channels_per_group(spec, widths)
