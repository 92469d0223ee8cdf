"""Batched augmentation and normalization of uint8 image batches, on whatever device they are on.

No Python loop over samples: every sample's crop offset and flip are index arithmetic, and the crop
and the flip together are one gather. The randomness comes in as tensors (drawn by the loader from
its epoch generator), so these functions are pure.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "draw_crop_flip", "Normalize"]


def draw_crop_flip(n: int, padding: int, hflip: bool, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (offsets (n, 2) in [0, 2 * padding], flips (n,) bool), drawn on the CPU."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop of each image zero-padded by `padding`, then a horizontal flip where `flips`.

    x: (B, C, H, W), any dtype; offsets: (B, 2) top-left corner of each crop in the padded image;
    flips: (B,) bool. Output pixel (i, j) of sample b is padded[b, :, oy + i, ox + j'] with
    j' = W - 1 - j when flipped, else j.
    """
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]  # (B, W)
    # two gathers along one axis each; x.gather needs full-size index tensors, so expand (no copy)
    hp, wp = x.shape[-2:]
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, wp))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class Normalize:
    """uint8 [0, 255] -> float32 (x / 255 - mean) / std, per channel, in one pass on the device."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift; rounding differs from torchvision's two steps by
        # at most an ulp, which nothing downstream can see
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(torch.float32), self.scale)
