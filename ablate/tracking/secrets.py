"""Keep API keys and tokens out of everything ablate writes: config.yaml, results.json, W&B, logs.

A secret can reach a config in two ways: a key that names one (`+logger.api_key=...`) or a value
that holds one (`${oc.env:WANDB_API_KEY}`, a token pasted into a tag). So three rules, applied to
every recorded config and record and to every log line:
- a value under a key that names a secret (api_key, token, password, secret, ...) is redacted;
- the value of any environment variable whose name names a secret (WANDB_API_KEY, HF_TOKEN, ...) is
  redacted wherever it appears, inside longer strings too;
- strings shaped like well-known token formats (GitHub, Hugging Face, OpenAI, Slack, AWS, W&B local
  keys) are redacted. Bare 40-hex strings are not: git commits look the same.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

__all__ = ["REDACTED", "ScrubLogFilter", "install_log_scrubber", "scrub", "scrub_args", "scrub_text",
           "secret_values"]

REDACTED = "<redacted>"
# whole words of a key: `api_key`, `wandb_token`, `password`; not `tokens` (a layout size) or `author`
SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|apikey|token|secret|password|passwd|pass|credentials?|"
                        r"auth[_-]?token|access[_-]?key|private[_-]?key|bearer)($|[_.-])", re.IGNORECASE)
TOKEN_SHAPES = re.compile(
    r"(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|local-[0-9a-f]{40,})")
_MIN_SECRET = 8  # shorter environment values ("1", "true") would redact ordinary words


def secret_values() -> list[str]:
    """Values of environment variables whose names name a secret, longest first."""
    values = {v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, values: list[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return TOKEN_SHAPES.sub(REDACTED, text)


def scrub(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of a config or record (dicts, lists, scalars) with every secret redacted."""
    values = secret_values() if values is None else values
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") and not isinstance(v, dict)
                    else scrub(v, values)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, values) for v in obj)
    if isinstance(obj, str):
        return _scrub_arg(obj, values)  # Hydra's record of its overrides holds `+logger.api_key=...`
    return obj


def _scrub_arg(arg: str, values: list[str]) -> str:
    """An override whose key names a secret keeps its key only (in Hydra's comma-joined overrides too:
    `data.batch_size=64,logger.api_key=...`); any other text is scrub_text's."""
    def override(part: str) -> str:
        key, equals, value = part.partition("=")
        return f"{key}={REDACTED}" if equals and value and SECRET_KEY.search(key.lstrip("+~")) else part
    return scrub_text(",".join(override(part) for part in arg.split(",")), values)


def scrub_args(args: list[str], values: list[str] | None = None) -> list[str]:
    """A command line with every secret redacted: an override whose key names one
    (`+logger.api_key=...` -> `+logger.api_key=<redacted>`), and secrets inside any argument."""
    values = secret_values() if values is None else values
    return [_scrub_arg(arg, values) for arg in args]


class ScrubLogFilter(logging.Filter):
    """Redacts secrets from a log record's final message (its arguments merged in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_scrubber() -> None:
    """Attach the filter to every handler of the root logger (filters on handlers see the records
    of every logger that propagates to them)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubLogFilter) for f in handler.filters):
            handler.addFilter(ScrubLogFilter())
