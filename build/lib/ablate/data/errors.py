"""The one exception type of the data side, and how a damaged file becomes one, in any process.

A data set that is missing or malformed, or a `data.*` setting that cannot work, raises DataError.
An image that cannot be decoded raises it too, naming the file (`unreadable`), also inside a loader's
worker processes: `Reported` hands the error back as a sample instead of raising it there (PyTorch
re-raises a worker's exception with the worker's whole traceback in its message, and without the
file), and `raise_reported` raises it in the main process as itself.
"""
from __future__ import annotations

from typing import Any

from PIL import Image
from torch.utils.data import Dataset, default_collate

from ablate.errors import BadInput

__all__ = ["DataError", "UNREADABLE", "unreadable", "Reported", "collate_reported", "raise_reported"]

# what PIL raises for a damaged file: OSError mostly, but SyntaxError ("broken PNG file") and
# ValueError ("Truncated IHDR chunk") for some damaged headers, and its guard against huge images
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(BadInput, RuntimeError):
    """A data set that is missing or malformed, or a `data.*` setting that cannot work.

    The message always says what to do: the package, flag, path or `data.*` override that fixes it.
    """


def unreadable(path: Any, err: BaseException) -> DataError:
    """The error for an image file PIL cannot decode (`err`, one of UNREADABLE)."""
    return DataError(f"{path} cannot be read ({type(err).__name__}: {err}). Replace or delete the damaged "
                     "file, or set data.root= to another copy of the data set.")


class Reported(Dataset):
    """`dataset` whose DataError is returned as the sample instead of raised (see the module)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except DataError as err:
            return err


def collate_reported(samples: list) -> Any:
    """default_collate, or the first DataError among the samples (a batch of a Reported dataset)."""
    return next((s for s in samples if isinstance(s, DataError)), None) or default_collate(samples)


def raise_reported(item: Any) -> Any:
    """`item`, a sample or batch from a Reported dataset's loader, unless it is a DataError: raised."""
    if isinstance(item, DataError):
        raise item
    return item
