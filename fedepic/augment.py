"""Batched, on-device data augmentation: random crop (zero padding) and horizontal flip.

Written by hand because torchvision's transforms work one image at a time (or apply one random
crop to a whole batch); here every image gets its own offsets in one indexing op, in the style of
airbench. Indexing is differentiable w.r.t. the input, so the same function serves Witches' Brew's
differentiable augmentation while brewing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _randint(high: int, size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (size,), generator=generator, device=gen_device).to(device)


def random_crop_flip(
    x: torch.Tensor,
    pad: int = 4,
    generator: torch.Generator | None = None,
    flip: bool = True,
) -> torch.Tensor:
    """Crop each image of `x` [B,C,H,W] at a random offset after zero-padding by `pad`; flip half of them.

    Matches torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip() in distribution.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects [B,C,H,W], got shape {tuple(x.shape)}")
    batch, _, height, width = x.shape
    device = x.device
    out = x
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = _randint(2 * pad + 1, batch, generator, device)
        dx = _randint(2 * pad + 1, batch, generator, device)
        rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
        batch_idx = torch.arange(batch, device=device)[:, None, None, None]
        chan_idx = torch.arange(x.shape[1], device=device)[None, :, None, None]
        out = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        flip_mask = _randint(2, batch, generator, device).bool()[:, None, None, None]
        out = torch.where(flip_mask, out.flip(3), out)
    return out
