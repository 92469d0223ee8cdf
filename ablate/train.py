"""`python -m ablate.train [overrides]`: train one composed configuration, or a sweep of them (-m).

    python -m ablate.train                                   # dwconv, micro, Fashion-MNIST
    python -m ablate.train operator=local_attention schedule.epochs=2 data.train_subset=5000
    python -m ablate.train -m sweeps=demo                    # a named grid (sweeps/demo.yaml)
    python -m ablate.train --cfg job --resolve               # the resolved config
    python -m ablate.train --info defaults-tree              # which option of each group

    torchrun --nproc_per_node 2 -m ablate.train trainer=ddp     # one run over 2 processes (DDP)

The command on top of the layers: Hydra composes the config, ablate's sweeper (registered here)
plans a sweep, and each job is one run of ablate/training.py, whose outcome it reports to the
sweeper or turns into the exit status. Exit codes: 0 completed, 1 failed, 2 bad input (nothing
trained; what to change is printed), 3 diverged, 4 another job holds the run folder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablate.cli import explain, run_cli
from ablate.config import CONF_DIR
from ablate.data import DataError
from ablate.errors import EXIT_CODES, ending_with_the_sweep
from ablate.runs import record_unrunnable, run_folder
from ablate.space.rules import InvalidOperatorError
from ablate.sweep import register_sweeper
from ablate.tracking import RunLocked, RunStore
from ablate.tracking.identity import IdentityConflict
from ablate.tracking.secrets import install_log_scrubber
from ablate.training import train

__all__ = ["job", "main", "cli", "run_command"]

log = logging.getLogger("ablate.train")
register_sweeper()  # `python -m ablate.train -m` sweeps with ablate's sweeper (conf/hydra/sweeper/)


def job(cfg: DictConfig) -> dict[str, Any]:
    """One job of a command (this one, ablate.downstream). A single run exits with its code; a sweep
    job returns its outcome to the sweeper, having recorded it in the run folder whatever happened,
    so the sweep goes on."""
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun the other ranks only warn
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s", force=True)
    install_log_scrubber()
    single_run = HydraConfig.get().mode == RunMode.RUN
    grid = HydraConfig.get().runtime.choices.get("sweeps")
    if single_run and grid not in (None, "null"):  # Hydra would train the grid's first job, silently
        log.error("error: sweeps=%s is a grid of runs (sweeps/%s.yaml), and without -m only one of them "
                  "would train: run it as a sweep, `python -m ablate.train -m sweeps=%s ...`.",
                  grid, grid, grid)
        sys.exit(EXIT_CODES["bad input"])
    try:
        # a sweep's job in a worker process stops at its checkpoint once the sweep is gone
        with contextlib.nullcontext() if single_run else ending_with_the_sweep():
            results = train(cfg)
    except (RunLocked, IdentityConflict) as err:  # another job's or experiment's folder: touch nothing
        log.error("error: %s", err)
        refused = isinstance(err, IdentityConflict)
        if single_run:
            sys.exit(EXIT_CODES["bad input" if refused else "locked"])
        return {"status": "refused" if refused else "locked", "folder": str(run_folder(cfg)),
                "error": str(err)}
    except (InvalidOperatorError, DataError, ValueError, OSError, RuntimeError) as err:
        log.error("error: %s", explain(err) or err)
        if single_run:
            sys.exit(EXIT_CODES["bad input"])
        folder = run_folder(cfg)
        if rank0:
            try:
                record_unrunnable(cfg, err)
            except OSError as again:  # e.g. the disk is full: said above; the sweep goes on
                log.error("could not record the failure in %s: %s", folder, again)
        return {"status": RunStore(folder).status(), "folder": str(folder), "error": str(err)}
    if single_run:
        sys.exit(EXIT_CODES.get(results["status"], 1))
    return {"status": results["status"], "folder": str(run_folder(cfg)), "error": results.get("error")}


def _check_override_syntax(args: list[str]) -> None:
    """Hydra's message for an override it cannot parse does not say which one; this one does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            print(f"error: cannot parse the override {arg!r}: {str(err).splitlines()[0]}. An override is "
                  "key=value (a list: key=[a,b]; quote a value with spaces or brackets: key='a b'); see "
                  "https://hydra.cc/docs/advanced/override_grammar/basic/", file=sys.stderr)
            sys.exit(EXIT_CODES["bad input"])


main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(job)


def run_command(app, argv: list[str] | None, name: str) -> None:
    """A Hydra command through the one error path of ablate/cli.py: bad input (an override that does
    not parse, a config that does not compose or validate, in a single run or a sweep) exits 2 with
    what to change; Ctrl-C 130, SIGTERM 143."""
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else name, *argv]
    try:
        _check_override_syntax(sys.argv[1:])
        run_cli(app, hydra_app=True)
    finally:
        sys.argv = saved


def cli(argv: list[str] | None = None) -> None:
    """`python -m ablate.train [args]`."""
    run_command(main, argv, "ablate.train")


if __name__ == "__main__":
    cli()
