"""Randomness of the training data that depends only on (run seed, epoch).

Each epoch draws from its own generator, seeded by hashing (seed, epoch), so a run resumed at epoch e
replays epoch e exactly, whatever happened before; nothing reads the global RNGs, which the model
(dropout, drop path) keeps using undisturbed.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["epoch_generator", "seeded_global_rngs"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch of a run. SeedSequence mixes the pair, so seeds never collide
    the way `seed + epoch` would (seed 1 epoch 0 == seed 0 epoch 1)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    state = np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU global RNGs for one sample, then restore them.

    Image transforms (timm, torchvision) draw from these globals. Seeding them per sample makes a
    sample's augmentation depend only on its seed: the same with 0 or 8 workers, in any worker, and it
    leaves the main process's RNG state (used by the model when num_workers=0) as it was. Only the CPU
    generator is touched: torch.manual_seed would also reseed CUDA generators in the main process.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
