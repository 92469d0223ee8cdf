"""Stratified validation split and training subset, drawn with a fixed split seed.

The split is part of the data set's definition, not of a run: it uses SPLIT_SEED, never the run's
seed, so every run of a sweep selects its model on the same validation images and trains on the same
subset. Inside each class the order is one fixed random permutation; validation takes its head, the
training subset the next samples. So the validation set does not depend on `train_subset`, and a
smaller subset is contained in a larger one.
"""
from __future__ import annotations

import torch

from ablate.data.errors import DataError

__all__ = ["SPLIT_SEED", "allocate", "stratified_split"]

SPLIT_SEED = 0


def allocate(total: int, counts: torch.Tensor) -> torch.Tensor:
    """Split `total` over classes in proportion to `counts` (largest remainder; ties: lower class)."""
    counts = counts.to(torch.int64)
    whole = int(counts.sum())
    share, remainder = (total * counts).div(whole, rounding_mode="floor"), (total * counts) % whole
    missing = total - int(share.sum())
    # a stable sort keeps the lower class first among equal remainders
    order = torch.sort(-remainder, stable=True).indices
    share[order[:missing]] += 1
    return share  # never above counts: share <= ceil(total * count / whole) <= count


def stratified_split(
    labels: torch.Tensor, num_classes: int, val_size: int, train_subset: int | None = None,
    seed: int = SPLIT_SEED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) into `labels`, each sorted, disjoint, stratified by class."""
    labels = labels.to(torch.int64).cpu()
    n = labels.numel()
    if not 0 <= val_size <= n - num_classes:
        raise DataError(
            f"data.val_size={val_size} does not fit: the training files hold {n} samples and at least "
            f"one per class ({num_classes}) must stay for training. Set data.val_size between 0 and "
            f"{n - num_classes}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    by_class = [perm[labels[perm] == c] for c in range(num_classes)]  # each in its fixed random order
    counts = torch.tensor([len(m) for m in by_class])
    n_val = allocate(val_size, counts)
    val = [m[:k] for m, k in zip(by_class, n_val.tolist())]
    rest = [m[k:] for m, k in zip(by_class, n_val.tolist())]
    if train_subset is not None:
        left = n - val_size
        if not num_classes <= train_subset <= left:
            raise DataError(
                f"data.train_subset={train_subset} does not fit: after data.val_size={val_size} the "
                f"training part holds {left} samples of {num_classes} classes. Set data.train_subset "
                f"between {num_classes} and {left} (or null for all of it, or lower data.val_size).")
        n_sub = allocate(train_subset, torch.tensor([len(m) for m in rest]))
        rest = [m[:k] for m, k in zip(rest, n_sub.tolist())]
    return torch.cat(rest).sort().values, torch.cat(val).sort().values
