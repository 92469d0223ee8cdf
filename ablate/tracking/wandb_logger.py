"""A W&B run that mirrors one run of the results store. Never the source of truth.

mode: online, offline or disabled; unset means online when an API key is configured, else offline.
The WANDB_MODE environment variable wins over the config. The run's files live inside the run
folder. Any W&B failure is logged and training goes on.

An unreachable server is decided once per process tree, within PROBE_TIMEOUT_S, before the first
online run (a GET of the server's health check, /healthz, through the proxy the environment names:
only a 2xx answer means a W&B server is there; a TCP connection or an error page does not, since
some networks accept every connection, or answer every request with 404): then every run of the
process and of the workers it starts (they inherit the decision through OFFLINE_ENV) is an offline
run in its run folder, complete, for `wandb sync <run folder>/wandb/offline-run-*` to upload later.
No run waits for W&B's own init timeout (about a minute) to learn what the first one learned.
"""
from __future__ import annotations

import logging
import netrc
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ablate.errors import ConfigError
from ablate.tracking.secrets import scrub_args

__all__ = ["WandbMirror", "resolve_mode", "server_problem", "server_unreachable", "summary_of", "OFFLINE_ENV",
           "PROBE_TIMEOUT_S"]

log = logging.getLogger(__name__)
OFFLINE_ENV = "ABLATE_WANDB_UNREACHABLE"  # set (to the reason) once the server was found unreachable
PROBE_TIMEOUT_S = 5.0
_probed: set[str] = set()  # servers this process found reachable


# the servers W&B uses where WANDB_BASE_URL is unset: api.wandb.ai and, since wandb 0.2x, CoreWeave's
# proxy of it, the name under which `wandb login` stores the key
_DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def _has_api_key() -> bool:
    """Whether W&B has a key: WANDB_API_KEY, or a .netrc entry (where W&B reads it: $NETRC, else
    ~/.netrc) for its server, named as `wandb login` names it (with the port a URL gives)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    url = urlparse(os.environ["WANDB_BASE_URL"]) if os.environ.get("WANDB_BASE_URL") else None
    hosts = (url.netloc, url.hostname) if url else _DEFAULT_HOSTS
    try:
        entries = netrc.netrc(os.path.expanduser(os.environ.get("NETRC") or "~/.netrc"))
    except (OSError, netrc.NetrcParseError):
        return False
    return any(host and entries.authenticators(host) is not None for host in hosts)


def server_problem() -> str | None:
    """Why no W&B server answers at WANDB_BASE_URL (default api.wandb.ai) now (None: one does); asks
    every time, within PROBE_TIMEOUT_S, and records nothing."""
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as err:  # HTTPError (not W&B), URLError, a timeout, a refused connection
        why = f"HTTP {err.code} from {url}/healthz" if isinstance(err, urllib.error.HTTPError) else (
            getattr(err, "reason", None) or err)
        return f"{url} cannot be reached (no W&B server answered within {PROBE_TIMEOUT_S:.0f} s: {why})"
    return None


def server_unreachable() -> str | None:
    """Why the W&B server cannot be reached (None: it can), decided once per process tree."""
    if os.environ.get(OFFLINE_ENV):
        return os.environ[OFFLINE_ENV]
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    if url in _probed:
        return None
    reason = server_problem()
    if reason:
        os.environ[OFFLINE_ENV] = reason  # for this process and the workers it starts
        log.warning("W&B: %s; every run is logged offline in its run folder (upload later: wandb sync "
                    "<run folder>/wandb/offline-run-*)", reason)
        return reason
    _probed.add(url)
    return None


def resolve_mode(configured: str | None) -> str:
    """online, offline or disabled: WANDB_MODE, else the configured mode, else online with an API
    key; online becomes offline where the server cannot be reached."""
    mode = os.environ.get("WANDB_MODE") or configured
    # bad input named where it was given (the environment wins over the config): a ConfigError, exit 2
    # in a single run and in a sweep alike
    given = f"WANDB_MODE={mode}" if os.environ.get("WANDB_MODE") else f"logger.mode={mode}"
    fix = "unset WANDB_MODE or set it to one of them" if os.environ.get("WANDB_MODE") else "set one of them"
    if mode in (None, "", "auto"):
        mode = "online" if _has_api_key() else "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"{given} is not a W&B mode: online, offline, disabled or auto; {fix}")
    if mode == "online" and server_unreachable():
        mode = "offline"
    return mode


def summary_of(results: dict) -> dict:
    """What a run's W&B summary holds of its record: the scalars (a summary keeps no lists or objects),
    and the record's `code` object as `code/fingerprint`, `code/commit`, `code/dirty`."""
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    code = results.get("code") if isinstance(results.get("code"), dict) else {}
    return {**scalars, **{f"code/{k}": v for k, v in code.items() if v is not None}}


class WandbMirror:
    """Start with `WandbMirror(...)`; `log`, `summary` and `finish` never raise."""

    def __init__(self, *, folder: Path, project: str, entity: str | None, name: str, group: str,
                 job_type: str, tags: list[str], config: dict[str, Any], mode: str | None,
                 init_timeout: float, run_id: str):
        self.run = None
        self.mode = resolve_mode(mode)
        if self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: no W&B mirror for this run")
            return
        args = dict(project=project, entity=entity, name=name, group=group, job_type=job_type,
                    tags=tags, config=config, dir=str(folder), id=run_id, resume="allow",
                    reinit="finish_previous")  # a second job in one process never reuses a run
        for mode in dict.fromkeys([self.mode, "offline"]):
            argv = sys.argv
            # W&B records the command line (the run's command, uploaded by a sync): its secrets redacted
            sys.argv = [argv[0], *scrub_args(argv[1:])]
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout,
                                                                         silent=True), **args)
                self.mode = mode
                return
            except Exception as err:  # noqa: BLE001  W&B must never stop training
                if mode == "online":  # the next runs of this process tree go offline at once
                    os.environ[OFFLINE_ENV] = f"online init failed: {type(err).__name__}: {err}"
                log.warning("W&B %s init failed (%s: %s)%s", mode, type(err).__name__, err,
                            "; trying offline" if mode != "offline" else "; going on without W&B")
            finally:
                sys.argv = argv

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # committed now: W&B holds a row logged with step= until a later step or the finish, where the
        # last epoch's row would land after the record's summary and overwrite its keys (lr)
        self._call("log", metrics, step=step, commit=True)

    def replay(self, rows: list[tuple[dict[str, Any], int]]) -> None:
        """Log the (metrics, step) rows of the epochs a resumed run trained before, those this W&B run
        does not hold: a resumed offline run is a new offline-run folder of the same id, and `wandb
        sync` keeps one such folder's history, so each must hold every epoch; online, the server's run
        holds the steps before its `starting_step` (a step logged twice would be refused)."""
        if self.run is None:
            return
        start = getattr(self.run, "starting_step", 0) or 0
        for metrics, step in rows:
            if step >= start:
                self.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(values)
            except Exception as err:  # noqa: BLE001
                log.warning("W&B summary failed: %s", err)

    def finish(self, exit_code: int = 0) -> None:
        self._call("finish", exit_code=exit_code)
        self.run = None

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            getattr(self.run, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed: %s", method, err)
