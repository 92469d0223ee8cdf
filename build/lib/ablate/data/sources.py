"""The small data sets, read from their original files by torchvision into uint8 tensors.

Each reader looks for the local files first and downloads only when they are missing and
`download` is set; a failed download (no internet) becomes a DataError that names what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from ablate.data.errors import DataError

__all__ = ["TensorSplit", "TENSOR_SOURCES", "load_fashion_mnist", "load_cifar10", "load_cifar100"]


@dataclass
class TensorSplit:
    """One split of a data set, decoded: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


# -- Fashion-MNIST ---------------------------------------------------------------------------------

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


# sha256 of the four original IDX files (decompressed), as Zalando publishes them and Debian's
# dataset-fashion-mnist ships them; `make data` checks them with sha256sum -c too
FMNIST_SHA256 = Path(__file__).with_name("fashion_mnist.sha256")
_VERIFIED = ".verified.json"  # in the data folder: (size, mtime) of each file whose checksum matched


def verify_checksums(folder: str | Path, sums_file: Path, fix: str) -> None:
    """Check every file of `sums_file` (sha256sum's format) in `folder`; DataError naming a damaged
    file and `fix`. A file is hashed once per size and modification time (remembered in the folder
    when it is writable), so a sweep's jobs do not hash the data set again."""
    folder = Path(folder)
    expected = dict(reversed(line.split()) for line in sums_file.read_text().splitlines() if line.strip())
    try:
        known = json.loads((folder / _VERIFIED).read_text())
    except (OSError, ValueError):
        known = {}
    changed = False
    for name, digest in expected.items():
        path = folder / name
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, digest]
        if known.get(name) == stamp:
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise DataError(f"{path} is damaged: its sha256 is {h.hexdigest()[:16]}..., the original file's "
                            f"{digest[:16]}... ({stat.st_size} bytes). {fix}")
        known[name], changed = stamp, True
    if changed:
        try:
            (folder / _VERIFIED).write_text(json.dumps(known))
        except OSError:  # a read-only copy of the data: checked again next time, which is cheap
            pass


def load_fashion_mnist(root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """(train 60k, test 10k) of Fashion-MNIST from <root>/FashionMNIST/raw (torchvision's place)."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    missing = [f for f in _FMNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing:
        fix = ("Run `make data` (it copies the original IDX files of Debian's package "
               "`dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist/*.gz, into "
               "data/FashionMNIST/raw), or set data.root= to a folder holding FashionMNIST/raw/, or "
               "data.download=true on a machine with internet.")
        if not download:
            raise DataError(f"Fashion-MNIST not found: {', '.join(missing)} missing in {raw}. {fix}")
        try:
            datasets.FashionMNIST(root, train=True, download=True)
        except Exception as err:  # torchvision raises RuntimeError / URLError / OSError offline
            raise DataError(
                f"Fashion-MNIST not found in {raw} and downloading it failed ({_one_line(err)}). "
                f"{fix}") from err
    verify_checksums(raw, FMNIST_SHA256, fix=(
        "Run `make data` again (it rebuilds data/FashionMNIST/raw from Debian's package; if that fails "
        "its check too, reinstall it: apt-get install --reinstall dataset-fashion-mnist), or delete the "
        "file and keep data.download=true on a machine with internet."))
    splits = []
    for train in (True, False):
        ds = datasets.FashionMNIST(root, train=train, download=False)
        splits.append(TensorSplit(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64),
                                  list(ds.classes)))
    return splits[0], splits[1]


# -- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------------

class _LocalCIFARMixin:
    """torchvision's CIFAR, accepting local files whose md5 differs from the official release.

    torchvision only reads pickles whose md5 matches the official archive. Files written by hand in
    the same format (a re-packed or cut-down CIFAR, the test suite's tiny sets) would be rejected and
    re-downloaded. The official check runs first; only when it fails and every file exists are the
    local files read as they are, with a warning. A truncated file then fails to unpickle, which
    `_load_cifar` turns into a DataError.
    """

    base_folder: str
    train_list: list
    test_list: list
    meta: dict
    root: str

    def _check_integrity(self) -> bool:
        if super()._check_integrity():  # type: ignore[misc]
            return True
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        if not all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in names):
            return False
        warnings.warn(f"{os.path.join(self.root, self.base_folder)}: md5 sums differ from the official "
                      f"{type(self).__name__} release; reading the local files as they are.", stacklevel=2)
        return True

    def _load_meta(self) -> None:
        # torchvision's version checks the meta file's md5 as well; the class names are all it needs
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class LocalCIFAR10(_LocalCIFARMixin, datasets.CIFAR10):
    pass


class LocalCIFAR100(_LocalCIFARMixin, datasets.CIFAR100):
    pass


def _load_cifar(cls: type, label: str, root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    folder = os.path.join(root, cls.base_folder)
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
    layout = (f"data.root must hold the extracted {cls.base_folder}/ ({', '.join(names)}): set "
              f"data.root=/path/to/the/folder/above/it")
    if missing:
        if not download:
            raise DataError(f"{label} not found: {', '.join(missing)} missing in {folder}. {layout}, "
                            f"or set data.download=true on a machine with internet.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(root, train=True, download=True)
        except Exception as err:  # URLError / OSError / RuntimeError without internet
            raise DataError(
                f"{label} not found in {folder}, and data.download=true tried to download {cls.url} "
                f"into {root}, which failed ({_one_line(err)}). Without internet, {layout}; "
                f"with internet, keep data.download=true.") from err
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except Exception as err:  # a truncated or foreign pickle
            raise DataError(f"{label} files in {folder} cannot be read ({_one_line(err)}). Replace "
                            f"them with the extracted official archive ({cls.url}).") from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
        splits.append(TensorSplit(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    return splits[0], splits[1]


def load_cifar10(root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """(train 50k, test 10k) of CIFAR-10 from <root>/cifar-10-batches-py."""
    return _load_cifar(LocalCIFAR10, "CIFAR-10", root, download)


def load_cifar100(root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """(train 50k, test 10k) of CIFAR-100 (fine labels) from <root>/cifar-100-python."""
    return _load_cifar(LocalCIFAR100, "CIFAR-100", root, download)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# name -> reader of (train, test); build_data looks data set names up here
TENSOR_SOURCES: dict[str, Callable[[str, bool], tuple[TensorSplit, TensorSplit]]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
