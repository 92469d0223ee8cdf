"""A W&B run that mirrors one run of the results store. Never the source of truth.

mode: online, offline or disabled; unset means online when an API key is configured, else offline.
The WANDB_MODE environment variable wins over the config. The run's files live inside the run
folder. Any W&B failure is logged and training goes on (an unreachable server falls back to an
offline run, so the history is still kept on disk).
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["WandbMirror", "resolve_mode"]

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str | None) -> str:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode in (None, "", "auto"):
        mode = "online" if _has_api_key() else "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be online, offline, disabled or auto; got {mode!r}")
    return mode


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
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout,
                                                                         silent=True), **args)
                self.mode = mode
                return
            except Exception as err:  # noqa: BLE001  W&B must never stop training
                log.warning("W&B %s init failed (%s: %s)%s", mode, type(err).__name__, err,
                            "; trying offline" if mode != "offline" else "; going on without W&B")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call("log", metrics, step=step)

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
