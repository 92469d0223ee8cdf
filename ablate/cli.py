"""One error path for every command: what a user must change, in a few lines, with one exit code.

Every command (`python -m ablate.train`, single run and sweep, `ablate.measure`, `ablate.bench`,
`ablate.reliability`, `ablate.gpu_check`, `analysis.report`) runs its main function through
`run_cli`, which turns

- bad input (BadInput and its kinds, Hydra's and OmegaConf's composition errors, a YAML file that
  does not parse, a path that cannot be read or written) into `error: <what and what to change>`
  and exit 2 - the same in a single run and in a sweep, since both meet the same exception here;
  a misspelt key of the training config, or one under the wrong group, gets "Did you mean ...?" from
  the config's own fields;
- SIGINT / SIGTERM into one line and exit 130 / 143, after stopping every process the command
  started (joblib or submitit_local workers), so none trains on as an orphan;
- anything else (a bug) into its traceback and exit 1.

ABLATE_TRACEBACK=1 (or Hydra's HYDRA_FULL_ERROR=1) prints the full traceback of bad input too.
It sits above the config (the layer that knows the keys it names); ablate.errors, at the bottom,
holds the error types every layer raises.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from ablate.config import TrainConfig
from ablate.errors import EXIT_CODES, BadInput, Interrupted, signals_raise, stop_children
from ablate.schema import schema_fields

__all__ = ["TRACEBACK_ENV", "explain", "run_cli"]

TRACEBACK_ENV = "ABLATE_TRACEBACK"


def _hydra_message(err: BaseException) -> str | None:
    try:
        from hydra.errors import HydraException, InstantiationException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, (ValueError, TypeError)):
        # a plugin's constructor refused its settings (e.g. hydra.sweeper.tune): its own words
        where = [line.strip() for line in str(err).splitlines() if line.strip().startswith("full_key:")]
        inner = explain(err.__cause__) or str(err.__cause__)
        return inner + (f" ({where[0]})" if where else "")
    if isinstance(err, InstantiationException):
        return None  # a plugin's constructor failed otherwise: a bug, shown with its traceback
    if isinstance(err, HydraException):
        text = str(err)
        if isinstance(err.__cause__, OmegaConfBaseException):
            text += "\n" + str(err.__cause__)
        elif err.__cause__ is not None and _yaml_message(err.__cause__):
            text += "\n" + _yaml_message(err.__cause__)
        return _compact(text)
    if isinstance(err, OmegaConfBaseException):
        return _compact(str(err))
    return None


def _compact(hydra_text: str) -> str:
    """Hydra's message without its config search path, its list of options on one line."""
    lines = hydra_text.strip().splitlines()
    if "Config search path:" in lines:
        lines = lines[:lines.index("Config search path:")]
    kept, options, group = [], [], None
    for line in lines:
        found = re.match(r"Available options in '(.+)':", line)
        if found:
            group = found.group(1)
        elif re.match(r"\s*(reference_type|object_type)=", line) or line.startswith("To append to your"):
            continue  # the schema's class names and a hint that a structured config refuses
        elif group and line.startswith("\t"):
            options.append(line.strip())
        elif line.strip():
            kept.append(line.strip())
    text = "\n".join(kept)
    unknown = re.search(r"full_key: (\S+)", text)
    if unknown and "not in" in text:
        text += _nearest_keys(unknown.group(1))
    converted = re.search(r"could not be converted to (Integer|Float|Boolean)", text)
    if unknown and converted:
        text += f"\nSet {unknown.group(1)} to {_KIND_OF_VALUE[converted.group(1)]}."
    if unknown and "is not a ListConfig, list or tuple" in text:  # a single value for a list field
        given = re.search(r"override \S+?=(\S+)", text)
        example = f" (e.g. {unknown.group(1)}=[{given.group(1)}])" if given else ""
        text += f"\nSet {unknown.group(1)} to a list in brackets{example}."
    if options:
        text += f"\nThe options of {group}: {', '.join(options)} (e.g. {group}={options[0]})."
    return text


# what a typed field takes, as the user writes it (OmegaConf names only the type it failed to make)
_KIND_OF_VALUE = {"Integer": "a whole number (e.g. 3)", "Float": "a number (e.g. 0.001 or 1e-3)",
                  "Boolean": "true or false"}


def _nearest_keys(full_key: str) -> str:
    """" Did you mean ...?" for a misspelt key of the training schema (else nothing): a near name
    in the same group first; else the key under another group (trainer.epochs -> schedule.epochs:
    a researcher remembers the name, not always where the config keeps it)."""
    parent, _, name = full_key.rpartition(".")
    keys = [key for key, _ in schema_fields(TrainConfig)]
    siblings = [key.rpartition(".")[2] for key in keys if key.rpartition(".")[0] == parent]
    near = [f"{parent + '.' if parent else ''}{n}" for n in difflib.get_close_matches(name, siblings, n=2)]
    if not near:
        leaves = sorted({key.rpartition(".")[2] for key in keys})
        found = [name] if name in leaves else difflib.get_close_matches(name, leaves, n=2, cutoff=0.8)
        near = [key for leaf in found for key in keys if key.rpartition(".")[2] == leaf][:3]
    return "\nDid you mean " + " or ".join(near) + "?" if near else ""


def _yaml_message(err: BaseException) -> str | None:
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(err, yaml.YAMLError):
        return None
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a YAML file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where} is not valid YAML: {problem}. Fix the file there."


def _os_message(err: OSError) -> str | None:
    if err.filename is None and err.errno is None:
        return None
    if err.filename is None and (err.strerror or "").rstrip().endswith("."):
        return err.strerror  # a sentence of ours that already says what to change
    path = f" {err.filename}" if err.filename else ""
    reason = err.strerror or type(err).__name__
    fix = {
        "PermissionError": "choose a folder you can write (e.g. --out or trainer.results_root=) or "
                           "change its permissions",
        "FileNotFoundError": "check the path",
        "IsADirectoryError": "give a file, not a folder",
        "NotADirectoryError": "a part of the path is a file: give a folder",
        "FileExistsError": "a file is where a folder should be: give a folder, or move the file",
    }.get(type(err).__name__, "check the path, its permissions and the free space")
    if err.errno == 30:  # EROFS
        fix = "the file system is read-only: choose a writable folder"
    elif err.errno == 28:  # ENOSPC
        fix = "the disk is full: free space or choose another folder"
    return f"{reason}:{path}. {fix[0].upper()}{fix[1:]}."


def explain(err: BaseException) -> str | None:
    """The message of an error the user fixes by changing input; None for anything else (a bug)."""
    if isinstance(err, BadInput):
        return str(err)
    message = _hydra_message(err) or _yaml_message(err)
    if message:
        return message
    if isinstance(err, OSError):
        return _os_message(err)
    return None


# Hydra's modes, of which a command takes one: its own check raises a bare ValueError (a traceback)
_MODES = {"-m": "-m (--multirun)", "--multirun": "-m (--multirun)", "-r": "--run", "--run": "--run",
          "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
          "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def _one_hydra_mode(args: list[str]) -> str | None:
    """The message for a command line that asks Hydra for two modes at once (None: it does not)."""
    given = list(dict.fromkeys(_MODES[a.split("=", 1)[0]] for a in args if a.split("=", 1)[0] in _MODES))
    if len(given) < 2:
        return None
    return (f"{' and '.join(given)} cannot be given together: a command runs one of --run, -m (--multirun), "
            "--cfg, --info, --shell-completion. Keep one (`--cfg job` prints the config of one job; "
            "`-m ...` runs the sweep).")


def run_cli(main: Callable[[], int | None], hydra_app: bool = False) -> NoReturn:
    """Run an entry point's main function through the one error path and exit with its code.

    `hydra_app`: main is a @hydra.main function. Hydra then raises what it would print (its
    HYDRA_FULL_ERROR mode, for this call only), so its errors meet the same path as ours.
    """
    full = os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved = os.environ.get("HYDRA_FULL_ERROR")
    if hydra_app:
        conflict = _one_hydra_mode(sys.argv[1:])
        if conflict:
            print(f"error: {conflict}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODES["bad input"])
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with signals_raise():
            code = main()
    except SystemExit:
        raise
    except Interrupted as stop:
        with signals_raise():  # a second Ctrl-C while stopping workers does not leave them running
            stopped = stop_children()
        extra = f" ({stopped} worker processes stopped)" if stopped else ""
        print(f"{stop.message}{extra}", file=sys.stderr, flush=True)
        sys.exit(stop.code)
    except KeyboardInterrupt:  # raised by code that replaced our handler
        stop_children()
        print("interrupted; the same command resumes", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODES["interrupted"])
    except Exception as err:  # noqa: BLE001  the one place that decides what a user sees
        message = explain(err)
        if message is None or full:
            traceback.print_exc()
        if message is None:
            sys.exit(EXIT_CODES["failed"])
        print(f"error: {message}", file=sys.stderr, flush=True)
        if not full:
            print(f"(the full traceback: {TRACEBACK_ENV}=1)", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODES["bad input"])
    finally:
        if hydra_app:
            if saved is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = saved
    sys.exit(code or 0)
