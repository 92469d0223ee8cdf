"""The one exception type of the data side: a data set or a data setting that cannot be used."""
from __future__ import annotations

from ablate.errors import BadInput

__all__ = ["DataError"]


class DataError(BadInput, RuntimeError):
    """A data set that is missing or malformed, or a `data.*` setting that cannot work.

    The message always says what to do: the package, flag, path or `data.*` override that fixes it.
    """
